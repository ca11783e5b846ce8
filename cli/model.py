"""``drscreen model activate`` and ``active``: the release the whole deployment serves.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import typer

from cli.console import db_errors
from cli.dispatch import load

app = typer.Typer(help="The release the whole deployment serves.", no_args_is_help=True)


@app.command("activate")
def model_activate(ref: str = typer.Argument(..., help="Released ensemble NAME@VERSION.")) -> None:
    """Make every worker serve this release: workers serving another one stop grading (their
    photographs wait for a worker that serves it) and refuse to start. Run it after the new
    release is on every worker machine, then restart the workers with DRSCREEN_MODEL set to it."""
    from core import repository as repo
    from core.db import session_scope
    from core.settings import get_settings

    if not ref.strip():  # a blank ref (an unset "$REF") meant the default: the newest release got pinned
        typer.echo("drscreen model activate: give the release as NAME@VERSION", err=True)
        raise typer.Exit(2)
    try:
        checked = load("ml.inference:check_release")(ref, get_settings().models_dir)
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"drscreen model activate: {ref} cannot be served: {exc}", err=True)
        raise typer.Exit(2) from exc
    with db_errors(), session_scope() as session:
        repo.activate_release(session, checked)
    typer.echo(f"active release: {checked}")


@app.command("active")
def model_active() -> None:
    """Print the release the deployment serves (none: each worker serves its DRSCREEN_MODEL)."""
    from core import repository as repo
    from core.db import session_scope

    with db_errors(), session_scope() as session:
        active = repo.active_release(session)
    typer.echo(active or "none activated: each worker serves its own DRSCREEN_MODEL")
