"""``drscreen status``: the deployment as one operator sees it: the active release, the queue, the
workers (their heartbeats, ``workers/heartbeat.py``) and what is wrong between them.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from cli.console import db_errors, redact

#: Workers not seen for longer are not listed (a container's node name changes with it: rows of
#: long-gone nodes would pile up); they are counted.
LISTED_FOR = timedelta(hours=24)

#: Its command joins the top-level ``drscreen`` group (cli.main).
app = typer.Typer()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _seen(seconds_ago: float) -> str:
    """How long ago a heartbeat was written; one dated ahead of this machine's clock says so (it
    read "0 s ago": the time review)."""
    from core.heartbeat import CLOCK_TOLERANCE

    if -seconds_ago > CLOCK_TOLERANCE.total_seconds():
        return _age(-seconds_ago) + " ahead"
    return _age(seconds_ago) + " ago"


def gather(now: datetime | None = None) -> dict[str, Any]:
    """The report as plain values (what ``--json`` prints). Raises SQLAlchemy's errors when the
    database cannot be read (the command turns them into one line)."""
    from core import backup, heartbeat
    from core import repository as repo
    from core.db import session_scope
    from core.settings import get_settings
    from core.store import FileStore
    from core.tables import as_utc, utcnow
    from services.metrics import image_counts, queue_depths

    settings = get_settings()
    now = now or utcnow()
    own = heartbeat.shared_settings(settings)
    with session_scope() as session:
        active = repo.active_release(session)
        by_status, _, oldest = image_counts(session)
        failed = repo.count_failed_images_since(session, now - timedelta(hours=24))
        open_jobs = repo.count_open_jobs(session)
        rows = repo.worker_heartbeats(session)
        listed = [row for row in rows if now - as_utc(row.seen_at) <= LISTED_FOR]
        warnings = heartbeat.warnings(rows, own, active, now)
        # a note, not a warning: sharing the roots may be meant (one organisation's clinics), and
        # a permanent exit 1 would hide real warnings from health scripts (the review)
        shared = settings.shared_roots_warning(repo.count_clinics_with_keys(session))
        notes = [shared] if shared else []
        workers = [
            {
                "node": row.node,
                "host": row.host,
                "pid": row.pid,
                "state": heartbeat.state(row, now),
                "release": row.release,
                "runtime": row.runtime,
                "precisions": row.precisions,
                "concurrency": row.concurrency,
                "code_version": row.code_version,
                "started_at": as_utc(row.started_at).isoformat(),
                "seen_at": as_utc(row.seen_at).isoformat(),
                "seen_seconds_ago": round((now - as_utc(row.seen_at)).total_seconds(), 1),
                "heartbeat_interval_s": row.interval_s,
                "settings": row.settings,
                "settings_fingerprint": heartbeat.fingerprint(row.settings),
            }
            for row in listed
        ]
    try:
        depths: dict[str, int] | str = queue_depths(settings)
    except Exception as exc:  # shown and warned about (exit 1), not fatal: the database answered
        depths = f"unavailable ({type(exc).__name__})"
        # a health script reads the exit code: exit 0 during a broker outage hid it (the operator
        # walkthrough); photographs wait for the sweep while it lasts
        warnings.append(f"the broker cannot be reached ({type(exc).__name__}): new photographs wait for it")
    if active is not None:
        from services.modelinfo import released_ensembles

        if active not in released_ensembles(settings.models_dir):  # (it logged why, if it was changed)
            warnings.append(
                f"the active release {active} is not usable from {settings.models_dir} (missing, or changed "
                "after its export: its SHA256SUMS disagrees): workers refuse it"
            )
    pending = backup.pending_problem(settings.store_path)
    if pending is not None:
        warnings.append(pending)
    if Path(settings.store_path).is_dir():  # (status may run where the store is not mounted)
        unwritable = FileStore(settings.store_path).write_problem(settings.max_upload_bytes)
        if unwritable is not None:
            warnings.append(f"the photograph store cannot take uploads: {unwritable}")
    return {
        "active_release": active,
        "queue": {
            "queued": int(by_status.get("queued", 0)),
            "running": int(by_status.get("running", 0)),
            "failed_last_24h": failed,
            "oldest_queued_seconds": round((now - as_utc(oldest)).total_seconds(), 1) if oldest else None,
            "open_folder_jobs": open_jobs,
            "broker": depths,
        },
        "workers": workers,
        "workers_not_listed": len(rows) - len(listed),
        "settings": own,
        "warnings": warnings,
        "notes": notes,
    }


def _runtime(worker: dict[str, Any]) -> str:
    # NULL until a pool child has loaded the model (or for good, if none could)
    runtime = worker["runtime"] or ("loading" if worker["state"] == "live" else "-")
    precisions = worker["precisions"] or {}
    if precisions:  # as the worker's log says it: "openvino bf16,f32"
        runtime += " " + ",".join(sorted(set(precisions.values())))
    return runtime


def render(report: dict[str, Any]) -> list[str]:
    """The report as text lines for a person."""
    queue = report["queue"]
    active = report["active_release"] or "none activated (each worker serves its own DRSCREEN_MODEL)"
    lines = [f"active release: {active}"]
    oldest = queue["oldest_queued_seconds"]
    waiting = f" (oldest waits {_age(oldest)})" if oldest is not None else ""
    lines.append(
        f"photographs: {queue['queued']} queued{waiting}, {queue['running']} running, "
        f"{queue['failed_last_24h']} failed in the last 24 h; open folder jobs: {queue['open_folder_jobs']}"
    )
    broker = queue["broker"]
    if isinstance(broker, dict):
        shown = ", ".join(f"{name} {n}" for name, n in broker.items()) or "not counted for this broker"
    else:
        shown = broker
    lines.append(f"broker queues: {shown}")
    workers = report["workers"]
    live = sum(1 for w in workers if w["state"] == "live")
    lines.append(f"workers: {live} live of {len(workers)} seen in the last 24 h")
    if workers:
        table = [("NODE", "HOST", "RELEASE", "RUNTIME", "SEEN", "STATE", "SETTINGS")]
        table += [
            (
                w["node"],
                w["host"],
                w["release"] or "-",
                _runtime(w),
                _seen(w["seen_seconds_ago"]),
                w["state"],
                w["settings_fingerprint"],
            )
            for w in workers
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines += [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
    if report["workers_not_listed"]:
        lines.append(f"  ({report['workers_not_listed']} not seen for more than 24 h, not listed)")
    if report["notes"]:
        lines.append("NOTE:")
        lines += [f"  - {note}" for note in report["notes"]]
    if report["warnings"]:
        lines.append("WARNING:")
        lines += [f"  - {warning}" for warning in report["warnings"]]
    return lines


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Show the active release, the queue and the workers (from their heartbeats), and WARN when a
    worker serves another release or a setting that must be alike differs (between workers, or
    from this machine's DRSCREEN_ settings). Exit 0: all well; 1: a warning; 2: database problem."""
    import json

    from core.migrate import SchemaBehind, check_schema_at_start
    from core.settings import get_settings

    try:
        unreachable = check_schema_at_start()
    except SchemaBehind as exc:
        typer.echo(f"drscreen status: {exc}", err=True)
        raise typer.Exit(2) from None
    if unreachable:  # one line, as db_errors says it
        url = redact(get_settings().database_url)
        typer.echo(f"drscreen: cannot use the database at {url}: {unreachable}", err=True)
        raise typer.Exit(2)
    with db_errors():
        report = gather()
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for line in render(report):
            typer.echo(line)
    if report["warnings"]:
        raise typer.Exit(1)
