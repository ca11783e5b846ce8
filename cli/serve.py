"""``drscreen serve``: the HTTP API under uvicorn, once the checks of cli.checks pass; several
uvicorn processes share one folder of request metrics.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from cli.checks import (
    API_SETTINGS,
    check_part_settings,
    refuse_other_schema,
    refuse_pending_replay,
    warn_about_settings,
)
from cli.dispatch import load

#: Its command joins the top-level ``drscreen`` group (cli.main).
app = typer.Typer()


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    # click refuses a port out of range (exit 2): uvicorn took 70000 as 70000 - 65536 = 4464
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    workers: int = typer.Option(1, "--workers", help="Uvicorn worker processes."),
    forwarded_allow_ips: str | None = typer.Option(
        None,
        "--forwarded-allow-ips",
        envvar="FORWARDED_ALLOW_IPS",
        help="Addresses of the TLS proxy whose X-Forwarded-Proto/-For are trusted (comma-separated, "
        "'*' for any; default uvicorn's, 127.0.0.1 and ::1): behind a proxy on another host the "
        "sign-in cookie is marked Secure only then.",
    ),
) -> None:
    """Run the HTTP API (uvicorn, services.app:create_app)."""
    load("services.app:create_app")  # clear message when the API is not installed
    import uvicorn

    from core.settings import get_settings

    check_part_settings(API_SETTINGS)
    warn_about_settings("drscreen serve")
    refuse_other_schema("drscreen serve")
    refuse_pending_replay("drscreen serve")
    with _metrics_shared_by(workers):
        uvicorn.run(
            "services.app:create_app_for_cli",  # checked just above: the app does not check again
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=get_settings().log_level.lower(),
            proxy_headers=True,
            # None: uvicorn's own default (FORWARDED_ALLOW_IPS, else 127.0.0.1 and ::1)
            forwarded_allow_ips=forwarded_allow_ips,
        )


@contextlib.contextmanager
def _metrics_shared_by(workers: int) -> Iterator[None]:
    """Several API processes on one port: their request metrics go to one fresh folder that every
    scrape sums (``services.metrics.MULTIPROC_ENV``); one given by the environment is kept."""
    import os
    import shutil
    import tempfile

    from services.metrics import MULTIPROC_ENV

    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="drscreen-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
