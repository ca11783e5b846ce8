"""Worker-only knobs, read from the same ``DRSCREEN_`` environment as :mod:`core.settings`.

They live here rather than in ``core`` because only workers act on them; the API never needs to.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DRSCREEN_", extra="ignore", env_file=None, env_ignore_empty=True
    )

    #: Draw Grad-CAM heatmaps for single images and bundles (folder jobs decide per job).
    explain: bool = True
    #: Torch intra-op threads per worker process; 0 = CPU count divided by the worker concurrency.
    torch_threads: int = Field(default=0, ge=0)
    #: Image ids per ``scoring.score_images`` task when a folder job is fanned out.
    score_chunk: int = Field(default=24, ge=1, le=256)
    #: Seconds between maintenance sweeps sent by each worker's main process; 0 disables them.
    sweep_interval_s: float = Field(default=300.0, ge=0)
    #: An image still ``queued`` after this many minutes is re-queued (its message may be lost).
    stale_queued_minutes: float = Field(default=15.0, gt=0)
    #: An image ``running`` for longer than this many minutes is re-queued (its worker died).
    stale_running_minutes: float = Field(default=30.0, gt=0)
    #: A photograph whose scoring was started this many times is failed instead of retried again
    #: (a poison pill that kills its worker must not loop forever).
    max_attempts: int = Field(default=5, ge=1)
    #: Seconds a new pool child may take to start (it loads torch and the ensemble) before the
    #: Celery parent gives up on it and kills it. Celery's own default (4 s) is far too short:
    #: a child replacing a crashed or recycled one would be killed over and over while loading.
    child_start_timeout_s: float = Field(default=600.0, gt=0)
    #: Seconds between the heartbeats each worker's main process writes to the database (its row
    #: in ``worker_heartbeat``; ``drscreen status``); independent of the sweep, which may be off.
    heartbeat_interval_s: float = Field(default=60.0, gt=0)


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()
