from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import PROJECT_ROOT, Settings, get_settings


def test_embedded_defaults(isolated_settings: Path) -> None:
    s = get_settings()
    assert s.database_url == f"sqlite:///{isolated_settings.resolve() / 'drscreen.db'}"
    assert s.broker_url == "filesystem://" and s.is_embedded_broker
    assert s.store_path == isolated_settings.resolve() / "store"
    assert s.model is None and s.runtime == "auto"
    assert s.models_dir == PROJECT_ROOT / "models"
    assert s.import_root_paths == []


def test_defaults_relative_to_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRSCREEN_VAR_DIR")
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.store_path == tmp_path / "var" / "store"
    assert s.database_url.endswith(str(tmp_path / "var" / "drscreen.db"))


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("DRSCREEN_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("DRSCREEN_IMPORT_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}:")
    monkeypatch.setenv("DRSCREEN_MODEL", "drscreen-ensemble@1.0.0")
    monkeypatch.setenv("DRSCREEN_RUNTIME", "onnx")
    monkeypatch.setenv("DRSCREEN_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("DRSCREEN_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("DRSCREEN_MODELS_DIR", str(tmp_path / "m"))
    get_settings.cache_clear()
    s = get_settings()
    assert s.database_url == "postgresql+psycopg://u@h/db" and not s.is_sqlite
    assert not s.is_embedded_broker
    assert s.store_path == tmp_path / "s"
    assert s.import_root_paths == [tmp_path / "a", tmp_path / "b"]
    assert s.model == "drscreen-ensemble@1.0.0" and s.runtime == "onnx"
    assert s.max_upload_bytes == 3 * 1024 * 1024 and s.max_image_pixels == 1000
    assert s.models_dir == tmp_path / "m"


def test_empty_model_means_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_MODEL", "")
    assert Settings().model is None


def test_an_empty_variable_is_an_unset_one(isolated_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`DRSCREEN_BROKER_URL=` (e.g. an env file's blank line) was the broker URL "": Celery then
    connected to amqp://guest@localhost; an empty DRSCREEN_STORE_DIR stored photographs in the
    current folder. Empty means the documented default, as it already did for DATABASE_URL/MODEL."""
    for name in ("BROKER_URL", "STORE_DIR", "DATABASE_URL", "MODEL", "MODELS_DIR", "LOG_LEVEL"):
        monkeypatch.setenv(f"DRSCREEN_{name}", "")
    s = Settings()
    assert s.broker_url == "filesystem://" and s.is_embedded_broker
    assert s.store_path == isolated_settings.resolve() / "store"
    assert s.database_url == f"sqlite:///{isolated_settings.resolve() / 'drscreen.db'}"
    assert s.model is None and s.models_dir == PROJECT_ROOT / "models" and s.log_level == "INFO"


def test_bad_values_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_RUNTIME", "tensorflow")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("DRSCREEN_RUNTIME", "torch")
    monkeypatch.setenv("DRSCREEN_MAX_UPLOAD_MB", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_openvino_runtime_and_its_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_RUNTIME", "openvino")
    assert Settings().runtime == "openvino" and Settings().openvino_precision == "auto"
    monkeypatch.setenv("DRSCREEN_OPENVINO_PRECISION", "bf16")
    assert Settings().openvino_precision == "bf16"
    monkeypatch.setenv("DRSCREEN_OPENVINO_PRECISION", "int8")
    with pytest.raises(ValidationError):
        Settings()


def test_models_dir_setting_reaches_the_ml_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """drscreen evaluate/export load releases through ml.release, which must see the same folder
    as the service's DRSCREEN_MODELS_DIR."""
    from ml.release import default_models_dir

    monkeypatch.setenv("DRSCREEN_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path.resolve()
    monkeypatch.delenv("DRSCREEN_MODELS_DIR")
    assert default_models_dir() == Path(__file__).resolve().parents[2] / "models"


def test_auto_runtime_is_openvino_on_a_cpu_machine_that_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.inference import openvino_runtime
    from workers import model

    monkeypatch.setattr(model, "GPU_DEVICE_FILES", ())  # this machine, or any without a GPU
    assert model.resolve_runtime(Settings(runtime="auto")) == "openvino"
    monkeypatch.setattr(openvino_runtime, "openvino_available", lambda: False)
    assert model.resolve_runtime(Settings(runtime="auto")) == "onnx"
    assert model.resolve_runtime(Settings(runtime="torch")) == "torch"


def test_a_gpu_host_loads_the_networks_on_the_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bench review (session 30): `auto` chose PyTorch for a CUDA host, and the worker then
    loaded the ensemble on the CPU (load_ensemble's device was never given). No GPU here: the
    device files and CUDA are stood in for, and what the worker asks load_ensemble for is checked."""
    import torch

    import ml.inference
    from workers import model

    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(model, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model.resolve_runtime(Settings(runtime="auto")) == "torch"
    assert model.resolve_device("torch") == "cuda"
    assert model.resolve_device("onnx") == "cpu"
    asked: dict[str, object] = {}

    def spy(*args: object, **kwargs: object) -> object:
        asked.update(kwargs)
        return type("Loaded", (), {"ref": "x@1"})()

    monkeypatch.setattr(ml.inference, "load_ensemble", spy)
    monkeypatch.setattr(model, "_ensemble", model._ensemble)  # put back after: load() keeps the stand-in
    model.load(Settings(runtime="auto"))
    assert asked["runtime"] == "torch" and asked["device"] == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model.load(Settings(runtime="auto"))
    assert asked["device"] == "cpu"


def test_migrations_out_of_reach_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A regular install puts core/ in site-packages, away from migrations/: say so (the Docker
    image's migrate step failed with Alembic's bare "Path doesn't exist")."""
    from core import migrate

    monkeypatch.setattr(migrate, "PROJECT_ROOT", tmp_path)
    with pytest.raises(RuntimeError, match="pip install -e"):
        migrate.alembic_config("sqlite:///:memory:")
    assert (PROJECT_ROOT / "migrations").is_dir()


def test_an_empty_variable_is_unset_for_the_api_and_workers_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.config import ApiSettings
    from workers.settings import WorkerSettings

    monkeypatch.setenv("DRSCREEN_SCORE_CHUNK", "")
    monkeypatch.setenv("DRSCREEN_RATE_LIMIT_BURST", "")
    assert WorkerSettings().score_chunk == WorkerSettings.model_fields["score_chunk"].default
    assert ApiSettings().rate_limit_burst == ApiSettings.model_fields["rate_limit_burst"].default
