"""What the operator at the terminal is told and asked: a missing schema or an unreachable database
as one line instead of a traceback (``db_errors``), the operator's detail of a domain error, a
database URL without its password, and a confirmation before anything is erased or replaced.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from typing import Any

import typer


def redact(url: str) -> str:
    """A database URL with its password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def confirm(question: str, refused: str = "nothing erased") -> None:
    """Ask (default no); a refusal says ``refused`` and exits 1."""
    if not typer.confirm(question, default=False):
        typer.echo(refused, err=True)
        raise typer.Exit(1)


def operator_text(exc: Any) -> str:
    """What an operator is told of a domain error: the detail a clinic is not given, if any
    (core.ledger.StoreRefused names the store's paths and keys)."""
    return str(getattr(exc, "operator_detail", None) or exc.message)


class db_errors:
    """Turn a missing schema or an unreachable database into a one-line message, not a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from core.errors import Unavailable

        if isinstance(exc, Unavailable):  # e.g. the restore ledger cannot be written: nothing changed
            typer.echo(f"drscreen: {operator_text(exc)}", err=True)
            raise typer.Exit(code=2)
        if (isinstance(exc, OperationalError | ProgrammingError) and "no such table" in str(exc)) or (
            isinstance(exc, ProgrammingError) and "does not exist" in str(exc)
        ):
            typer.echo("drscreen: the database has no schema yet; run `drscreen db upgrade`.", err=True)
            raise typer.Exit(code=2)
        if isinstance(exc, OperationalError):
            from core.settings import get_settings

            first = str(exc.orig or exc).strip().splitlines()[0][:300]
            url = redact(get_settings().database_url)
            typer.echo(f"drscreen: cannot use the database at {url}: {first}", err=True)
            raise typer.Exit(code=2)
