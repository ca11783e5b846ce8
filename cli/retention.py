"""``drscreen data erase`` and ``purge`` (core.retention): one patient's data, or every patient past
a retention period, with the stored files nothing references any more. cli.main adds them to the
``data`` group (cli.data).

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import typer

from cli.checks import refuse_other_schema
from cli.console import confirm, db_errors, operator_text
from cli.data import clinic_id_of, operator

#: Its commands join the ``data`` group (cli.main).
app = typer.Typer()


#: The longest retention period ``data purge`` takes (about 1,000 years).
MAX_RETENTION_DAYS = 365_000


#: A preview's copy of the database is made in a folder named so beside it, followed by the pid of
#: the process that made it: a copy whose process is gone was left by a preview that was killed.
PREVIEW_PREFIX = ".drscreen-preview-"


def _sqlite_file() -> Path | None:
    """The SQLite database's file, or None (PostgreSQL, or SQLite in memory)."""
    from sqlalchemy.engine import make_url

    from core.settings import get_settings

    url = make_url(get_settings().database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def _remove_left_previews(database: Path) -> None:
    """Remove the copies of the database that killed previews left beside it (SIGKILL, a power
    cut: nothing ran their clean-up). Each is a whole copy of the database: the disk space of one,
    and the rows of every patient erased since, which an erasure must not leave behind."""
    import shutil

    for folder in database.parent.glob(PREVIEW_PREFIX + "*"):
        pid = folder.name[len(PREVIEW_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextmanager
def _stopped_cleanly() -> Iterator[None]:
    """SIGTERM (``timeout``, systemd, a scheduler stopping the command) ends the process as an
    exception would, so ``finally`` blocks run: by default it kills Python on the spot, and a
    preview left its copy of the database behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


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
    import os
    import shutil
    import sqlite3
    import tempfile
    from contextlib import closing

    from sqlalchemy.orm import Session

    from core.db import get_sessionmaker, make_engine
    from core.errors import Unavailable

    live = _sqlite_file()
    if live is None:
        with get_sessionmaker()() as session:
            yield session
        return
    _remove_left_previews(live)
    with _stopped_cleanly():
        try:
            prefix = f"{PREVIEW_PREFIX}{os.getpid()}-"
            folder = Path(tempfile.mkdtemp(prefix=prefix, dir=live.parent))  # owner only
        except OSError as exc:
            raise Unavailable(f"the preview's copy of the database cannot be made beside it: {exc}") from exc
        try:
            snapshot = folder / live.name
            try:
                src = closing(sqlite3.connect(live, timeout=30))
                with src as source, closing(sqlite3.connect(snapshot)) as copy:
                    source.backup(copy)
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
    from core import retention
    from core.db import get_sessionmaker
    from core.errors import Conflict, Unavailable
    from core.settings import get_settings
    from core.store import FileStore

    with db_errors(), ExitStack() as stack:
        if commit and (database := _sqlite_file()) is not None:
            _remove_left_previews(database)  # an erasure leaves no copy of the patient behind
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
