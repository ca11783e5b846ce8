"""``drscreen worker``: a Celery worker of the uploads, scoring and explain queues, started only when its
model loads, the checks of cli.checks pass and it serves the deployment's active release.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli.checks import (
    WORKER_SETTINGS,
    check_part_settings,
    refuse_other_schema,
    refuse_pending_replay,
    warn_about_settings,
)
from cli.dispatch import load

#: Its command joins the top-level ``drscreen`` group (cli.main).
app = typer.Typer()


#: core.tasks.WORKER_QUEUES, spelt out: the cli imports core lazily (``drscreen --help`` stays
#: instant); tests/unit/test_uploads_queue.py keeps the two equal.
WORKER_QUEUES = "uploads,scoring,explain"

#: image.claimed_by and worker_heartbeat.node hold a Celery node name (String(255)).
NODE_NAME_MAX = 255


@app.command()
def worker(
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Worker processes."),
    queues: str = typer.Option(WORKER_QUEUES, "--queues", "-Q", help="Comma-separated queues."),
    loglevel: str = typer.Option(None, "--loglevel", "-l", help="Default: DRSCREEN_LOG_LEVEL."),
    hostname: str = typer.Option(
        None,
        "--hostname",
        "-n",
        help="Celery node name (default celery@<host>); give each worker on one host its own.",
    ),
    celery_app: str = typer.Option(
        "workers.app:celery_app", "--app", hidden=True, help="module:attr of the Celery app."
    ),
) -> None:
    """Run a Celery worker consuming the uploads, scoring and explain queues."""
    from core.settings import get_settings

    settings = get_settings()
    if hostname and len(hostname) > NODE_NAME_MAX:  # claims and heartbeats store it: PostgreSQL refused
        typer.echo(f"drscreen worker: --hostname is longer than {NODE_NAME_MAX} characters", err=True)
        raise typer.Exit(2)
    # before the app's import: workers.app reads the worker settings as it is imported (a bad value
    # was pydantic's traceback)
    check_part_settings(WORKER_SETTINGS)
    application = load(celery_app)
    if celery_app == "workers.app:celery_app":  # (test apps without a database: --app)
        from workers.model import check_release

        try:
            ref = check_release(settings)
        except (OSError, ValueError, KeyError) as exc:
            typer.echo(f"drscreen worker: the model cannot be loaded, not starting: {exc}", err=True)
            raise typer.Exit(2) from exc
        warn_about_settings("drscreen worker")
        refuse_other_schema("drscreen worker")
        refuse_pending_replay("drscreen worker")
        _refuse_other_release(ref)
        if not Path(settings.store_path).is_dir():
            # not fatal (an embedded API creates it on its first upload), but on a machine of its
            # own this is the usual mistake: photographs would be retried, then failed
            typer.echo(
                f"drscreen worker: warning: the file store {settings.store_path} does not exist; "
                "photographs are read from the folder the API stores them in (DRSCREEN_STORE_DIR, "
                "shared between machines)",
                err=True,
            )
        typer.echo(f"drscreen worker: serving {ref}")
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        loglevel or settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    application.worker_main(argv=argv)


def _refuse_other_release(ref: str) -> None:
    """Exit 2 when the deployment has an active release (``drscreen model activate``) and this
    worker would serve another: a patient's result comes from one release."""
    from sqlalchemy.exc import OperationalError

    from core import repository as repo
    from core.db import session_scope

    try:
        with session_scope() as session:
            active = repo.other_active_release(session, ref)
    except OperationalError:
        return  # not reachable now: said by refuse_other_schema; each task checks again
    if active is not None:
        typer.echo(
            f"drscreen worker: not starting: the deployment serves {active} (drscreen model "
            f"activate) and this worker would serve {ref}: set DRSCREEN_MODEL={active}",
            err=True,
        )
        raise typer.Exit(2)
