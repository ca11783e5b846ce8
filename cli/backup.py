"""``drscreen db backup``, ``restore``, ``replay-ledger`` and ``verify-backup`` (core.backup): the
database with the stored files it names, and the restore ledger's erasures and key revocations
done again after a restore. cli.main adds them to the ``db`` group (cli.db).

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from cli.checks import refuse_other_schema
from cli.console import confirm, db_errors, redact

#: Its commands join the ``db`` group (cli.main).
app = typer.Typer()


def _file_progress(items: Any, total: int, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="file", disable=total < 100, file=sys.stderr)


@contextlib.contextmanager
def backup_errors(command: str) -> Iterator[None]:
    """A backup that cannot be done, or a database that cannot be used: one line, exit 2."""
    from core.backup import BackupError

    try:
        with db_errors():
            yield
    except BackupError as exc:
        typer.echo(f"drscreen db {command}: {exc}", err=True)
        raise typer.Exit(2) from None


def _backup_lines(report: Any, verb: str) -> None:
    typer.echo(
        f"{verb} {report.database} database (schema {report.revision or 'empty'}) and {report.files} "
        f"stored files: {report.copied} copied, {report.kept} already there"
    )
    if report.key == "replaced":
        typer.echo(
            "NOTE: the store's deployment key was replaced by the backup's (its audit rows use it)", err=True
        )
    if report.missing:
        typer.echo(
            f"NOTE: {len(report.missing)} file(s) named by the database are in neither store (erased "
            f"while the backup ran, or lost), e.g. {report.missing[0]}",
            err=True,
        )
    if report.damaged:
        typer.echo(
            f"WARNING: {len(report.damaged)} file(s) of the backup are damaged (their bytes no longer match "
            f"their names) and were not restored, e.g. {report.damaged[0]}",
            err=True,
        )


_FORCE_HELP = "Do what the checks refuse (another deployment's backup; a target in use)."


@app.command("backup")
def db_backup(
    folder: Path = typer.Argument(..., help="Folder to write (a second backup there copies only new files)."),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
) -> None:
    """Back up the database and the stored photographs and heatmaps it names, while the service runs."""
    from core.backup import take_backup
    from core.settings import get_settings

    settings = get_settings()
    with backup_errors("backup"):
        report = take_backup(folder, settings.database_url, settings.store_path, _file_progress, force=force)
    _backup_lines(report, f"backed up to {folder}:")
    typer.echo(f"snapshot of {report.taken_at}: what the service accepts after it is not in this backup")
    if report.ledger_problem:
        typer.echo(
            f"WARNING: the store's restore ledger cannot be read ({report.ledger_problem}): a restore "
            'would refuse it; see README "Backup and restore"',
            err=True,
        )
    if report.pruned:
        typer.echo(f"{report.pruned} file(s) no longer named by the database removed from the backup")


@app.command("restore")
def db_restore(
    folder: Path = typer.Argument(..., help="A folder `drscreen db backup` wrote."),
    yes: bool = typer.Option(False, "--yes", help="Replace the database without asking."),
    remove_unnamed: bool = typer.Option(
        False, "--remove-unnamed", help="Delete the store's files that no restored row names."
    ),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
) -> None:
    """Replace the database with a backup and put its files back in the store (API and workers
    stopped); patients erased and keys revoked after the backup are erased and revoked again."""
    from core.backup import read_manifest, restore_backup
    from core.settings import get_settings

    settings = get_settings()
    with backup_errors("restore"):
        manifest = read_manifest(folder)
    taken = manifest.get("taken_at")
    typer.echo(
        f"restoring the snapshot of {taken} into the database at {redact(settings.database_url)} "
        f"and the store {settings.store_path}"
    )
    if not yes:
        confirm("Replace everything in that database with the backup?", refused="nothing restored")
    with backup_errors("restore"):
        report = restore_backup(
            folder,
            settings.database_url,
            settings.store_path,
            _file_progress,
            remove_unnamed=remove_unnamed,
            force=force,
        )
    _backup_lines(report, f"restored from {folder}:")
    if report.pruned and remove_unnamed:
        typer.echo(f"{report.pruned} file(s) of the store named by no restored row deleted")
    elif report.pruned:
        typer.echo(
            f"NOTE: {report.pruned} file(s) of the store are named by no restored row (photographs sent "
            "after the backup); `--remove-unnamed` deletes them",
            err=True,
        )
    if report.resent:
        typer.echo(
            f"{report.resent} photograph(s) or folder job(s) were waiting: the workers' next sweep sends them"
        )
    if report.replayed is None:
        typer.echo(
            "NOTE: the backup's schema is older than this release's: run `drscreen db upgrade`; it then "
            "does again the erasures and key revocations made after the backup (the API and workers "
            "refuse to start until then)",
            err=True,
        )
    else:
        replayed_lines(report.replayed)
    typer.echo(
        f"NOTE: everything accepted after {taken} is gone (clinics re-send it), API keys created since "
        "too; staff sign in again",
        err=True,
    )
    typer.echo("run `drscreen db upgrade` if this release's schema is newer, then start the API and workers")


def replayed_lines(done: Any) -> None:
    typer.echo(
        f"done again from the restore ledger: {done.erasures} patient erasure(s) and {done.revocations} "
        "API key revocation(s) made after the backup"
    )
    if done.unconfirmed:
        typer.echo(
            f"WARNING: {done.unconfirmed} erasure(s) of the restore ledger have no confirmed commit, and "
            "neither the database the restore replaced nor this one holds them (a crash between an "
            "erasure's line and its commit): not done again; check your records for erasures made just "
            'before the crash (README "Backup and restore")',
            err=True,
        )
    if done.unknown_key:
        typer.echo(
            f"WARNING: {done.unknown_key} erasure(s) of the ledger were recorded with a deployment key "
            "neither this store nor the backup holds: those patients may be back; erase them again",
            err=True,
        )


@app.command("replay-ledger")
def db_replay_ledger() -> None:
    """Erase again the patients and revoke again the API keys the store's ledger records and the
    database lacks (after restoring an older backup and `drscreen db upgrade`; a restore does it
    itself otherwise). Running it again changes nothing."""
    from core.backup import replay_ledger
    from core.settings import get_settings

    refuse_other_schema("drscreen db replay-ledger")
    settings = get_settings()
    with backup_errors("replay-ledger"):
        done = replay_ledger(settings.database_url, settings.store_path)
    replayed_lines(done)


@app.command("verify-backup")
def db_verify_backup(folder: Path = typer.Argument(..., help="A folder `drscreen db backup` wrote.")) -> None:
    """Read a backup back: every stored file must still hash to its name, the dump and the key must
    be there. Changes nothing; exit 1 when anything is wrong."""
    from core.backup import verify_backup

    with backup_errors("verify-backup"):
        report = verify_backup(folder, _file_progress)
    for problem in report.problems:
        typer.echo(f"PROBLEM: {problem}", err=True)
    for relpath in report.damaged[:20]:
        typer.echo(f"DAMAGED: {relpath}", err=True)
    if report.problems or report.damaged:
        typer.echo(
            f"the backup of {report.taken_at} in {folder} is NOT whole: {len(report.damaged)} of "
            f"{report.files} stored file(s) damaged, {len(report.problems)} other problem(s)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"the backup of {report.taken_at} in {folder} is whole: {report.files} stored file(s) checked")
