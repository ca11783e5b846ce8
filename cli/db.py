"""``drscreen db upgrade`` and ``check`` (the schema, core.migrate), ``recheck-patients``
(cli.recheck) and ``palette-photographs`` (cli.palette). The group's backup commands are in
cli.backup; cli.main adds them after these.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import typer

from cli.backup import backup_errors, replayed_lines
from cli.console import db_errors, redact

app = typer.Typer(help="Database schema (Alembic migrations), backups and restores.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or update the schema (DRSCREEN_DATABASE_URL) to the newest migration."""
    from alembic.util.exc import CommandError

    from core.migrate import current_revision, upgrade, upgrade_problem
    from core.settings import get_settings

    url = get_settings().database_url
    if not revision.strip():
        typer.echo("drscreen db upgrade: give a revision (or none, for head)", err=True)
        raise typer.Exit(2)
    try:
        with db_errors():
            problem = upgrade_problem(url)
            if problem is not None:
                typer.echo(f"drscreen db upgrade: {problem}", err=True)
                raise typer.Exit(2)
            upgrade(url, revision)
    # an unknown or impossible revision: one line, as `db check` says it (alembic raises an
    # AssertionError for some relative forms, e.g. "head+5")
    except (CommandError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or ["alembic upgrade failed"])[0][:300]
        typer.echo(f"drscreen db upgrade: {reason}", err=True)
        raise typer.Exit(2) from None
    # the revision the database is at now (upgrading to an older one, e.g. "base", changes nothing)
    typer.echo(f"database at {redact(url)} is at {current_revision(url) or 'base (empty)'}")
    _replay_if_pending()


def _replay_if_pending() -> None:
    """After the upgrade an older backup's restore needs: the replay it left to do (core.ledger)."""
    from core.backup import REPLAYING, pending_stage
    from core.migrate import current_revision, head_revision
    from core.settings import get_settings

    settings = get_settings()
    if pending_stage(settings.store_path) != REPLAYING:
        return
    if current_revision(settings.database_url) != head_revision():
        typer.echo("NOTE: a restore's replay waits for the newest schema: `drscreen db upgrade`", err=True)
        return
    from core.backup import replay_ledger

    with backup_errors("upgrade"):
        replayed_lines(replay_ledger(settings.database_url, settings.store_path))


@app.command("check")
def db_check() -> None:
    """Fail when core.tables and the migrations differ (alembic check)."""
    from alembic.util.exc import CommandError

    from core.migrate import check

    try:
        with db_errors():
            check()
    except CommandError as exc:  # alembic's verdict, not a crash: one line (was ~50 of traceback)
        reason = (str(exc).strip().splitlines() or ["alembic check failed"])[0][:300]
        if "not up to date" in reason:
            reason += " (run `drscreen db upgrade`)"
        typer.echo(f"drscreen db check: {reason}", err=True)
        raise typer.Exit(1) from None
    typer.echo("schema and migrations agree")


@app.command("palette-photographs")
def db_palette_photographs() -> None:
    """List stored photographs that are palette (256-colour) images, graded before they were
    refused (session 31): their grades may be too low; have a grader look at them again."""
    from cli.palette import palette_photographs

    with db_errors():
        found, missing = palette_photographs()
    for p in found:
        typer.echo(f"{p.image_id}\t{p.clinic}\t{p.patient_id}\t{p.filename or ''}")
    gone = f"; {missing} file(s) missing from the store" if missing else ""
    typer.echo(f"{len(found)} palette photograph(s){gone}", err=True)


@app.command("recheck-patients")
def db_recheck_patients(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would change; record nothing."),
) -> None:
    """Apply the current patient rule to results recorded before it (once, after an upgrade)."""
    from cli.recheck import recheck_patients

    with db_errors():
        summary = recheck_patients(dry_run=dry_run)
    verb = "would change" if dry_run else "changed"
    typer.echo(
        f"{summary.checked} patient result(s) checked, {len(summary.changed)} {verb}"
        + (f": {', '.join(summary.changed[:20])}" if summary.changed else "")
        + (" ..." if len(summary.changed) > 20 else "")
        + (
            f"; {summary.other_visit} left to the workers (photographs of a newer visit)"
            if summary.other_visit
            else ""
        )
        + (f"; {summary.held} referral(s) kept while a photograph is graded again" if summary.held else "")
    )
    if summary.no_release:
        typer.echo(
            "NOTE: not checked, release not under the models folder: "
            + ", ".join(sorted(summary.no_release)),
            err=True,
        )
