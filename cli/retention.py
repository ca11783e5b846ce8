"""``drscreen data erase`` and ``purge`` (core.retention): one patient's data, or every patient past
a retention period, with the stored files nothing references any more. cli.main adds them to the
``data`` group (cli.data).

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from cli.checks import refuse_other_schema
from cli.console import confirm, db_errors, operator_text
from cli.data import clinic_id_of, operator

#: Its commands join the ``data`` group (cli.main).
app = typer.Typer()


#: The longest retention period ``data purge`` takes (about 1,000 years).
MAX_RETENTION_DAYS = 365_000


@contextmanager
def _preview_session() -> Iterator[Any]:
    """The session a preview runs in. A preview makes the real erasure or purge and rolls it back,
    so its counts are the real run's; on SQLite that held the database's one write lock for all of
    it, and every upload and worker write waited (answering 503, failing, after 30 s): a purge
    preview of 2,600 patients held it 4.5 s on a busy 2-core machine (the SQLite review of session
    32), and a "delete nothing" preview is what an operator runs in the day. On SQLite it runs on
    a snapshot of the database taken with SQLite's online backup (as ``drscreen db backup``:
    writers go on meanwhile), in a private folder beside it, removed afterwards. PostgreSQL locks
    only the rows concerned: the database itself."""
    import shutil
    import sqlite3
    import tempfile
    from contextlib import closing
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import Session

    from core.db import get_sessionmaker, make_engine
    from core.errors import Unavailable
    from core.settings import get_settings

    url = get_settings().database_url
    database = make_url(url).database
    if make_url(url).get_backend_name() != "sqlite" or not database or database == ":memory:":
        with get_sessionmaker()() as session:
            yield session
        return
    live = Path(database)
    try:
        folder = Path(tempfile.mkdtemp(prefix=".drscreen-preview-", dir=live.parent))  # owner only
    except OSError as exc:
        raise Unavailable(f"the preview's copy of the database cannot be made beside it: {exc}") from exc
    try:
        snapshot = folder / live.name
        try:
            with closing(sqlite3.connect(live, timeout=30)) as src, closing(sqlite3.connect(snapshot)) as dst:
                src.backup(dst)
        except (sqlite3.Error, OSError) as exc:  # e.g. the disk is full: nothing was previewed
            raise Unavailable(
                f"the preview's copy of the database could not be made in {folder}: {exc}"
            ) from exc
        engine = make_engine(f"sqlite:///{snapshot}")
        try:
            with Session(bind=engine, expire_on_commit=False) as session:
                yield session
        finally:
            engine.dispose()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _retention(command: str, run: Any, *, commit: bool) -> tuple[Any, int]:
    """Run ``run(session)`` (core.retention) in one transaction; commit and then remove the files
    nothing references any more, or roll back (a dry run: the counts are the real run's, from a
    snapshot on SQLite: :func:`_preview_session`). Returns (outcome, files removed)."""
    from contextlib import ExitStack

    from core import retention
    from core.db import get_sessionmaker
    from core.errors import Conflict, Unavailable
    from core.settings import get_settings
    from core.store import FileStore

    with db_errors(), ExitStack() as stack:
        session = get_sessionmaker()() if commit else stack.enter_context(_preview_session())
        try:
            outcome = run(session)
            if not commit:
                session.rollback()
                return outcome, 0
            session.commit()
            store = FileStore(get_settings().store_path)
            removed = retention.remove_unreferenced_files(session, store, outcome.files)
            session.commit()
            return outcome, removed
        except Conflict as exc:
            typer.echo(f"{command}: {exc.message}, or add --force", err=True)
            raise typer.Exit(1) from None
        except Unavailable as exc:
            typer.echo(f"{command}: {operator_text(exc)}", err=True)
            raise typer.Exit(2) from None
        finally:
            session.rollback()
            session.close()


def _print_counts(outcome: Any, files: int, files_label: str) -> None:
    for table, n in outcome.rows.items():
        typer.echo(f"  {table:<18}{n:>8}")
    typer.echo(f"  {files_label:<18}{files:>8}")


@app.command("erase")
def data_erase(
    patient_id: str = typer.Argument(..., help="The clinic's patient id."),
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (as given to `keys create`)."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    force: bool = typer.Option(
        False, "--force", help="Erase even while photographs of the patient are still being scored."
    ),
) -> None:
    """Erase everything drscreen holds about one patient of one clinic (cannot be undone).

    Photographs, heatmaps, results and history go; the audit log records the erasure with its
    counts, not the patient id."""
    import re

    from core import retention
    from core.schemas import PATIENT_ID_PATTERN

    command = "drscreen data erase"
    if not re.fullmatch(PATIENT_ID_PATTERN, patient_id):
        typer.echo(f"{command}: {patient_id!r} is not a patient id (letters, digits, . _ -)", err=True)
        raise typer.Exit(2)
    refuse_other_schema(command)
    clinic_id = clinic_id_of(command, clinic)

    def run(session: Any, *, forced: bool = force) -> Any:
        return retention.erase_patient(session, clinic_id, patient_id, force=forced, by=operator())

    if not yes:  # show what would go, then ask (the preview is rolled back)
        preview, _ = _retention(command, lambda s: run(s, forced=True), commit=False)
        if not preview.found:
            typer.echo(f"no patient {patient_id!r} in clinic {clinic!r}: nothing to erase (0 rows)")
            return
        if preview.in_flight and not force:
            typer.echo(
                f"{command}: {preview.in_flight} photograph(s) of this patient are still being scored; "
                "erase the patient once they are done, or add --force",
                err=True,
            )
            raise typer.Exit(1)
        _print_counts(preview, len(preview.files), "stored files")
        confirm(f"Erase patient {patient_id!r} of clinic {clinic!r} as listed above?")
    outcome, removed = _retention(command, run, commit=True)
    if not outcome.found:
        typer.echo(f"no patient {patient_id!r} in clinic {clinic!r}: nothing to erase (0 rows)")
        return
    typer.echo(f"erased patient {patient_id!r} of clinic {clinic!r}: {outcome.total_rows} rows")
    _print_counts(outcome, removed, "files removed")


@app.command("purge")
def data_purge(
    older_than: int = typer.Option(
        ...,
        "--older-than",
        metavar="DAYS",
        help="Erase the patients whose newest photograph (uploaded, or sent again by a folder job) is older.",
    ),
    clinic: str | None = typer.Option(None, "--clinic", help="Only this clinic (default: every clinic)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be deleted; delete nothing."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
) -> None:
    """Enforce a retention period: erase the patients whose newest photograph is older than DAYS.

    A patient with a newer photograph keeps everything; finished folder jobs and records from
    before then that no patient owns go too. Patients with photographs still being scored are
    skipped."""
    from datetime import timedelta

    from core import retention
    from core.tables import utcnow

    command = "drscreen data purge"
    if older_than < 1:
        typer.echo(f"{command}: --older-than must be at least 1 day", err=True)
        raise typer.Exit(2)
    if older_than > MAX_RETENTION_DAYS:  # the cutoff would fall before year 1 (a traceback)
        typer.echo(f"{command}: --older-than must be at most {MAX_RETENTION_DAYS} days", err=True)
        raise typer.Exit(2)
    refuse_other_schema(command)
    clinic_id = clinic_id_of(command, clinic) if clinic is not None else None
    cutoff = utcnow() - timedelta(days=older_than)

    def run(session: Any) -> Any:
        return retention.purge_before(session, cutoff, clinic_id, by=operator())

    where = f"clinic {clinic!r}" if clinic is not None else "every clinic"
    rule = f"{where}, patients whose newest photograph is older than {cutoff:%Y-%m-%d %H:%M} UTC"
    if dry_run or not yes:
        preview, _ = _retention(command, run, commit=False)
        typer.echo(f"would delete ({rule}):")
        _print_counts(preview, len(preview.files), "stored files")
        if preview.skipped_patients:
            typer.echo(f"  {preview.skipped_patients} patient(s) skipped: photographs still being scored")
        if dry_run:
            return
        confirm("Delete all of the above?")
    outcome, removed = _retention(command, run, commit=True)
    typer.echo(f"purged ({rule}): {outcome.total_rows} rows")
    _print_counts(outcome, removed, "files removed")
    if outcome.skipped_patients:
        typer.echo(f"  {outcome.skipped_patients} patient(s) skipped: photographs still being scored")
