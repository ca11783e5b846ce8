"""What a command checks before it starts: the settings (one line per invalid value, exit 2), the
API's and the workers' own settings, settings that are valid but almost certainly not meant
(warnings), a database schema behind this code's and a restore's replay not yet run (exit 2).

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

from cli.dispatch import load


def invalid_settings(exc: Any) -> None:
    """Pydantic's ValidationError as one line per invalid setting (its DRSCREEN_ name), exit 2."""
    for error in exc.errors():
        name = "DRSCREEN_" + "_".join(str(part) for part in error["loc"]).upper()
        typer.echo(f"drscreen: invalid setting {name}: {error['msg']}", err=True)
    raise typer.Exit(code=2)


API_SETTINGS, WORKER_SETTINGS = "services.config:get_api_settings", "workers.settings:get_worker_settings"


def check_part_settings(target: str) -> None:
    """The API's or the workers' own settings (``module:getter``), checked the same way."""
    from pydantic import ValidationError

    try:
        load(target)()
    except ValidationError as exc:
        invalid_settings(exc)


#: DRSCREEN_ names read outside the settings classes (scripts, the bench, the tests' own)
_OTHER_NAMES = {"ONNX_CACHE", "BENCH_PHOTOS", "BENCH_CONCURRENCY", "DATA", "BIN"}


def warn_about_settings(command: str) -> None:
    """Warnings for settings that are valid but almost certainly not meant (the operator review):
    a misspelt DRSCREEN_ name is otherwise ignored in silence, and a PostgreSQL deployment still
    on the embedded file broker publishes work that workers elsewhere never see."""
    import os

    from pydantic_settings import BaseSettings

    from core.settings import Settings, get_settings

    classes: list[type[BaseSettings]] = [Settings]
    for module, name in (("services.config", "ApiSettings"), ("workers.settings", "WorkerSettings")):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except ImportError:  # that part is not installed: its names are not checked
            continue
    known = {f.upper() for cls in classes for f in cls.model_fields} | _OTHER_NAMES
    for name in sorted(os.environ):
        rest = name.removeprefix("DRSCREEN_")
        if rest != name and rest not in known and not rest.startswith("TEST_"):
            typer.echo(f"{command}: warning: unknown setting {name} is ignored (misspelt?)", err=True)
    settings = get_settings()
    if settings.database_url.startswith("postgresql") and settings.is_embedded_broker:
        typer.echo(
            f"{command}: warning: PostgreSQL with the embedded file broker: work is queued in "
            "this machine's folder, which workers elsewhere never see (set DRSCREEN_BROKER_URL)",
            err=True,
        )


def refuse_other_schema(command: str) -> None:
    """Exit 2 with one line when the database's schema is behind this code's; start anyway (with a
    warning) when the database cannot be reached yet: it may come up after the API or worker."""
    from core.migrate import SchemaBehind, check_schema_at_start

    try:
        unreachable = check_schema_at_start()
    except SchemaBehind as exc:
        typer.echo(f"{command}: not starting: {exc}", err=True)
        raise typer.Exit(2) from None
    if unreachable:
        typer.echo(f"{command}: database not reachable now ({unreachable}); schema not checked", err=True)


def refuse_pending_replay(command: str) -> None:
    """Exit 2 while a restore's replay of the restore ledger has not run (core.ledger): patients
    erased after the backup would be served again."""
    from core.backup import pending_problem
    from core.settings import get_settings

    problem = pending_problem(get_settings().store_path)
    if problem is not None:
        typer.echo(f"{command}: not starting: {problem}", err=True)
        raise typer.Exit(2)
