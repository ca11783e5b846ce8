"""``drscreen keys create``, ``revoke`` and ``list``: the clinics' API keys.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from typing import Any

import typer

from cli.console import db_errors

app = typer.Typer(help="API keys of the clinics.", no_args_is_help=True)


@app.command("create")
def keys_create(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (created when new)."),
    label: str | None = typer.Option(None, "--label", help="A note to recognise the key."),
) -> None:
    """Create an API key for a clinic and print it ONCE (only its hash is stored)."""
    from core import repository as repo
    from core.db import session_scope
    from core.errors import InvalidInput

    try:
        with db_errors(), session_scope() as session:
            row_clinic = repo.get_or_create_clinic(session, clinic)
            row, plaintext = repo.create_api_key(session, row_clinic, label=label)
            key_id, prefix = row.id, row.prefix
    except InvalidInput as exc:  # e.g. a blank clinic name: one line, nothing written
        typer.echo(f"drscreen keys create: {exc.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(plaintext)
    typer.echo(f"key id {key_id} (prefix {prefix}) for clinic {clinic!r}; it is not shown again.", err=True)
    if "/" in clinic or "\\" in clinic:  # the README: <root>/<clinic name>/ must be one folder name
        typer.echo(
            f"NOTE: {clinic!r} cannot be a folder name: with DRSCREEN_IMPORT_PER_CLINIC this clinic's "
            "folder jobs are refused (name clinics without '/' or '\\' where folder jobs are used)",
            err=True,
        )


#: The largest key id a database holds (api_key.id is a signed 32-bit integer on PostgreSQL).
_MAX_KEY_ID = 2**31 - 1


@app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="Key id, key prefix or the key itself.")) -> None:
    """Revoke an API key (also where the restore ledger cannot be written: then with a WARNING)."""
    from core.errors import Unavailable
    from core.ledger import store_problem
    from core.settings import get_settings

    with db_errors():
        store = get_settings().store_path
        problem = _in_session(lambda session: store_problem(session, store, may_make_key=False))
        if problem is None:
            try:
                n = _revoke_count(key, record=True)
            except Unavailable as exc:  # the ledger cannot be written: revoke all the same
                problem, n = exc.message, _revoke_count(key, record=False)
        else:
            n = _revoke_count(key, record=False)
    if not n:
        typer.echo("no active key matched", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"revoked {n} key(s)")
    if problem is not None:  # revoked all the same: a leaked key must not stay usable
        typer.echo(
            f"WARNING: not recorded in the restore ledger ({problem}): after restoring a backup older "
            "than now, revoke it again (or run this where the deployment's store is)",
            err=True,
        )


def _in_session(run: Any) -> Any:
    """``run(session)`` in one transaction, committed."""
    from core.db import session_scope

    with session_scope() as session:
        return run(session)


def _revoke_count(key: str, *, record: bool) -> int:
    """Revoke ``key`` (an id, a prefix or the key itself) in one transaction; how many."""
    from core import repository as repo

    def run(session: Any) -> int:
        if key.startswith(repo.API_KEY_PREFIX) and len(key) > 12:
            found = repo.authenticate_api_key(session, key, touch=False)
            return repo.revoke_api_key(session, found.id, record=record) if found else 0
        if key.isdigit() and not (key.isascii() and len(key) <= 10 and int(key) <= _MAX_KEY_ID):
            return 0  # no such id (the database driver's OverflowError, or int("²"), was a traceback)
        return int(repo.revoke_api_key(session, key, record=record))

    return int(_in_session(run))


@app.command("list")
def keys_list(clinic: str | None = typer.Option(None, "--clinic")) -> None:
    """List keys (id, prefix, clinic, revoked)."""
    from core import repository as repo
    from core.db import session_scope

    with db_errors(), session_scope() as session:
        clinic_id = None
        if clinic is not None:
            found = repo.get_clinic_by_name(session, clinic)
            if found is None:
                typer.echo(f"no clinic {clinic!r}", err=True)
                raise typer.Exit(code=1)
            clinic_id = found.id
        for k in repo.list_api_keys(session, clinic_id):
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            typer.echo(f"{k.id}\t{k.prefix}\t{k.clinic.name}\t{state}\t{k.label or ''}")
