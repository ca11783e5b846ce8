"""One settings class (environment prefix ``DRSCREEN_``), read through the cached :func:`get_settings`.

The defaults are the embedded mode: a SQLite file, a filesystem broker and a local file store, all
under ``./var`` (relative to the current directory), so nothing needs a server.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The repository root (the folder holding ``core/``); released models live in ``<root>/models``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

EMBEDDED_BROKER = "filesystem://"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    # env_ignore_empty: `DRSCREEN_X=` means "unset", the default (an empty broker URL was Celery's
    # amqp://guest@localhost, an empty store folder the current directory)
    model_config = SettingsConfigDict(
        env_prefix="DRSCREEN_", extra="ignore", env_file=None, env_ignore_empty=True
    )

    #: Root of every embedded-mode default (database file, broker folders, store).
    var_dir: Path = Path("var")
    #: SQLAlchemy URL. Default: ``sqlite:///<var_dir>/drscreen.db``.
    database_url: str = ""
    #: Celery broker URL. Default: the embedded filesystem broker under ``<var_dir>/broker``.
    broker_url: str = EMBEDDED_BROKER
    #: Where photographs and heatmaps are kept (content addressed). Default ``<var_dir>/store``.
    store_dir: Path | None = None
    #: Folders that ``POST /v1/jobs`` may read (colon separated in the environment).
    import_roots: str = ""
    #: Give each clinic its own part of the import roots: a clinic's folder jobs may read only
    #: ``<root>/<clinic name>/``. Off, every clinic may read every root (one clinic per server).
    import_per_clinic: bool = False
    #: Released ensemble workers load, ``name@version``; None = the newest shipped under models_dir.
    model: str | None = None
    #: Inference runtime used by workers; ``auto`` = PyTorch when a GPU is present, otherwise
    #: OpenVINO where installed, else ONNX Runtime (docs/performance.md). Heatmaps need PyTorch
    #: (autograd) only with ``torch``; the CPU runtimes draw them from the graphs' feature maps.
    runtime: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    #: OpenVINO's precision (``runtime = "openvino"``): ``auto`` = bfloat16 where `drscreen export
    #: onnx` accepted it for the ensemble's weights (issue 7's accuracy rule), float32 otherwise.
    openvino_precision: Literal["auto", "f32", "bf16"] = "auto"
    #: Largest accepted upload, in MiB.
    max_upload_mb: int = Field(default=25, gt=0)
    #: Largest accepted photograph, in pixels (width * height); guards against decompression bombs.
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    #: Folder with the released models.
    models_dir: Path = PROJECT_ROOT / "models"
    #: Log level for the API and workers.
    log_level: str = "INFO"
    #: A patient's current result comes from one screening visit: the photographs uploaded within
    #: this many hours of their newest one (older visits stay in the history). 0 = every photograph.
    visit_window_hours: float = Field(default=24.0, ge=0)
    #: Percent of the photographs a release did not refer that graders are asked to grade as well
    #: (``GET /v1/grading-queue``), so that the agreement can estimate what the release missed.
    grader_sample_percent: float = Field(default=10.0, ge=0, le=100)

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _installed_postgres_driver(cls, value: str) -> str:
        # postgres:// (Heroku-style) and plain postgresql:// name psycopg2, which is not installed;
        # psycopg (3) is
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value.removeprefix(prefix)
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.var_dir = self.var_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'drscreen.db'}"
        if self.store_dir is None:
            self.store_dir = self.var_dir / "store"
        self.store_dir = self.store_dir.expanduser().resolve()
        self.models_dir = self.models_dir.expanduser().resolve()
        return self

    # Convenience views -------------------------------------------------------------------------

    @property
    def visit_window(self) -> timedelta:
        """``visit_window_hours`` as the span ``repository.latest_visit`` takes."""
        return timedelta(hours=self.visit_window_hours)

    @property
    def store_path(self) -> Path:
        """The store directory (always set after validation)."""
        assert self.store_dir is not None
        return self.store_dir

    @property
    def import_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.import_roots.split(":") if p.strip()]

    def shared_roots_warning(self, clinics_with_keys: int) -> str | None:
        """A warning when several clinics share every import root (``import_per_clinic`` off):
        each one's folder jobs can read the others' exports and see them as its own patients
        (the security review; single-clinic servers keep the simple default)."""
        if self.import_per_clinic or not self.import_root_paths or clinics_with_keys < 2:
            return None
        return (
            f"{clinics_with_keys} clinics hold API keys and DRSCREEN_IMPORT_PER_CLINIC is false: "
            "every clinic's folder jobs can read every import root, the other clinics' exports "
            "included; set it to true (each clinic then reads <root>/<clinic name>/ only)"
        )

    def import_roots_for(self, clinic_name: str) -> list[Path]:
        """The folders one clinic's jobs may read: every root, or with ``import_per_clinic`` each
        root's ``<clinic name>`` subfolder (none for a name that is not one plain folder name)."""
        if not self.import_per_clinic:
            return self.import_root_paths
        if clinic_name in ("", ".", "..") or any(c in clinic_name for c in "/\\\x00"):
            return []
        return [(root / clinic_name).resolve() for root in self.import_root_paths]

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem broker."""
        return self.var_dir / "broker"

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached). Tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
