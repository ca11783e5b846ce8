"""Worker heartbeats read back: which workers are live, and whether what must be alike across the
deployment is alike (``drscreen status``, ``/metrics``).

Workers write their ``worker_heartbeat`` row (``workers/heartbeat.py``) with the values of the
settings below. Only values are kept, never secrets: no database or broker URL.

Live: seen within :data:`LIVE_INTERVALS` of the worker's own heartbeat interval (kept in its row,
so a reader needs no knowledge of the workers' settings) and not stopped. Timestamps are each
machine's clock, as every other timestamp drscreen compares between machines (keep them in sync).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core import deployment_key
from core.settings import Settings
from core.tables import WorkerHeartbeat, as_utc

#: A worker not seen for this many of its heartbeat intervals is stale (one late beat on a busy
#: machine or a database hiccup must not make it look dead).
LIVE_INTERVALS = 3

#: A worker row not seen for this long is deleted when any worker starts (its node name is gone).
FORGOTTEN_AFTER = timedelta(days=30)

#: What `drscreen status` tells "this process" by in its findings.
THIS_PROCESS = "this process"


def shared_settings(settings: Settings) -> dict[str, Any]:
    """The settings the API and every worker must agree on (README "More machines"): a patient's
    visit, which folders jobs may read (the API checks the folder, the worker reads it), the
    decompression-bomb cap, and the one store folder every process reads photographs from (a
    worker with another one failed every photograph, session 18). Paths as resolved on this
    machine, import roots sorted (their order means nothing)."""
    return {
        "visit_window_hours": settings.visit_window_hours,
        "import_roots": sorted(str(p) for p in settings.import_root_paths),
        "import_per_clinic": settings.import_per_clinic,
        "max_image_pixels": settings.max_image_pixels,
        "store_dir": str(settings.store_path),
        # the same path written on two machines can be two disks: the store's key tells them apart
        STORE_IDENTITY: deployment_key.fingerprint(settings.store_path),
    }


def fingerprint(values: dict[str, Any] | None) -> str:
    """A short digest of settings values, to tell at a glance which workers agree."""
    canonical = json.dumps(values or {}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def state(row: WorkerHeartbeat, now: datetime) -> str:
    """``live``, ``stale`` (no heartbeat for more than LIVE_INTERVALS intervals: dead, hung, or
    cut off from the database) or ``stopped`` (a warm shutdown)."""
    if row.stopped_at is not None:
        return "stopped"
    limit = timedelta(seconds=LIVE_INTERVALS * row.interval_s)
    return "live" if now - as_utc(row.seen_at) <= limit else "stale"


def live_workers(rows: Iterable[WorkerHeartbeat], now: datetime) -> list[WorkerHeartbeat]:
    return [row for row in rows if state(row, now) == "live"]


#: The shared "setting" that is no environment variable: the fingerprint of the store's key file.
STORE_IDENTITY = "store_identity"


def env_name(setting: str) -> str:
    """How a setting is named to the operator (its environment variable)."""
    if setting == STORE_IDENTITY:
        return f"the store folder's key ({deployment_key.KEY_FILE}: another disk at the same path?)"
    return "DRSCREEN_" + setting.upper()


def _shown(value: Any) -> str:
    if isinstance(value, list):  # import roots, as they are written in the environment
        return ":".join(str(v) for v in value) or "(none)"
    return json.dumps(value)


@dataclass(frozen=True)
class Mismatch:
    """One setting with more than one value among the processes compared."""

    setting: str
    values: dict[str, list[str]]  # the value as shown -> the processes (node names) that have it

    def describe(self) -> str:
        groups = "; ".join(f"{', '.join(who)}: {value}" for value, who in self.values.items())
        return f"{env_name(self.setting)} differs: {groups}"


def settings_mismatches(
    workers: Sequence[WorkerHeartbeat], own: dict[str, Any] | None = None
) -> list[Mismatch]:
    """Settings whose values differ between ``workers`` (pass the live ones), or between a worker
    and ``own`` (this process's :func:`shared_settings`; worker-only settings are compared between
    workers only, since the API's machine need not set them). A setting a worker does not report
    (older code) is not compared for it."""
    sources: list[tuple[str, dict[str, Any]]] = [(THIS_PROCESS, own)] if own is not None else []
    sources += [(row.node, row.settings or {}) for row in workers]
    names = sorted({name for _, values in sources for name in values})
    found = []
    for name in names:
        by_value: dict[str, list[str]] = {}
        for who, values in sources:
            if name in values:
                by_value.setdefault(_shown(values[name]), []).append(who)
        if len(by_value) > 1:
            found.append(Mismatch(name, by_value))
    return found


def release_warnings(workers: Sequence[WorkerHeartbeat], active: str | None) -> list[str]:
    """Live ``workers`` serving a release other than the activated one (they grade nothing), or,
    with none activated, serving several (a patient's result may flip between releases)."""
    if active is not None:
        return [
            f"{row.node} serves {row.release or 'an unknown release'}, not the active release "
            f"{active}: it grades nothing (restart it with DRSCREEN_MODEL={active})"
            for row in workers
            if row.release != active
        ]
    by_release: dict[str, list[str]] = {}
    for row in workers:
        by_release.setdefault(row.release or "unknown", []).append(row.node)
    if len(by_release) < 2:
        return []
    listed = "; ".join(f"{ref}: {', '.join(nodes)}" for ref, nodes in sorted(by_release.items()))
    return [
        f"live workers serve {len(by_release)} releases ({listed}) and none is activated: a "
        "patient's result may flip between them (`drscreen model activate NAME@VERSION`)"
    ]


def warnings(
    rows: Sequence[WorkerHeartbeat], own: dict[str, Any] | None, active: str | None, now: datetime
) -> list[str]:
    """Everything ``drscreen status`` warns about, one line each (empty: all is well)."""
    live = live_workers(rows, now)
    if not live:
        return [
            f"no worker is live (none sent a heartbeat within {LIVE_INTERVALS} of its intervals): "
            "nothing is being graded"
        ]
    return (
        release_warnings(live, active)
        + [m.describe() for m in settings_mismatches(live, own)]
        + loading_warnings(live, now)
        + clock_warnings(live, now)
    )


#: A live worker whose pool has not loaded the model after this long is stuck: its children fail
#: to load it and are started again (the default DRSCREEN_CHILD_START_TIMEOUT_S).
LOADING_TOO_LONG = timedelta(minutes=10)


def loading_warnings(live: Sequence[WorkerHeartbeat], now: datetime) -> list[str]:
    """Live workers that have served nothing since they started: ``status`` said "live, loading"
    with exit 0 while every photograph waited (the release review, session 29)."""
    stuck = [(row, now - as_utc(row.started_at)) for row in live if row.runtime is None]
    return [
        f"worker {row.node} has not loaded its model {int(waited.total_seconds() // 60)} min after "
        "starting: its pool cannot load the release (see its log); photographs wait"
        for row, waited in stuck
        if waited > LOADING_TOO_LONG
    ]


#: A heartbeat dated further ahead of the reader's clock than this says the two machines' clocks
#: differ (a beat is dated when written, so it can only look older, never newer, on one clock).
CLOCK_TOLERANCE = timedelta(seconds=30)


def clock_ahead(row: WorkerHeartbeat, now: datetime) -> timedelta | None:
    """How far ``row``'s worker's clock is ahead of ``now``'s, when it is by more than the
    tolerance (None otherwise)."""
    ahead = as_utc(row.seen_at) - now
    return ahead if ahead > CLOCK_TOLERANCE else None


def clock_warnings(live: Sequence[WorkerHeartbeat], now: datetime) -> list[str]:
    """Live workers whose clock is ahead of this machine's (the time review, session 32): the
    sweep compares its own clock with the times other machines wrote, so a clock minutes ahead
    re-sends photographs early, and its own heartbeat keeps it "live" that much longer after it
    died. One whose clock is behind shows as stale (its heartbeat looks old)."""
    return [
        f"the clock of worker {row.node} is at least {_minutes(ahead)} ahead of this machine's (its "
        "heartbeat is dated in the future): keep every machine's clock in sync (NTP); the sweep's "
        "limits and the workers' liveness read these clocks"
        for row in live
        if (ahead := clock_ahead(row, now)) is not None
    ]


def _minutes(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"
