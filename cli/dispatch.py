"""Commands implemented elsewhere are looked up lazily (``module:function``) and called with plain
values: every heavy import happens inside the command that needs it, so ``drscreen --help`` stays
instant. A part that is not installed is one line, exit 2; a command's non-zero result is its exit code.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer


def load(target: str) -> Any:
    """Import ``module:attr``; exit with a clear message when that part is not installed."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            typer.echo(
                f"drscreen: this command needs `{module_name}`, which is not available in this "
                f"installation (module `{missing}` not found).",
                err=True,
            )
            raise typer.Exit(code=2) from exc
        typer.echo(
            f"drscreen: `{module_name}` needs the Python package `{missing}`; install the extras "
            "(pip install -e '.[ml]').",
            err=True,
        )
        raise typer.Exit(code=2) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        typer.echo(f"drscreen: `{target}` does not exist in this installation.", err=True)
        raise typer.Exit(code=2) from exc


def finish(result: Any) -> None:
    """A command's non-zero int result becomes the exit code."""
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise typer.Exit(code=result)
