"""``drscreen``: the one front door. A thin dispatcher: every heavy import happens inside the
command that needs it, so ``drscreen --help`` stays instant.

This module assembles the app; the commands live in one module per command or group:

- cli.pipeline: ``demo``, ``score``, ``evaluate``, ``train``, ``export``, ``bench``
- cli.serve, cli.worker, cli.status: ``serve``, ``worker``, ``status``
- cli.db and cli.backup: ``db``; cli.keys: ``keys``; cli.model: ``model``
- cli.data and cli.retention: ``data``

and what they share: cli.dispatch (commands implemented elsewhere, looked up lazily as
module:function and called with plain values), cli.checks (what a command checks before it
starts), cli.console (one-line errors, confirmations).
"""

from __future__ import annotations

import typer

from cli import backup, data, db, keys, model, pipeline, retention, serve, status, worker
from cli.checks import invalid_settings

app = typer.Typer(
    name="drscreen",
    help="Diabetic-retinopathy screening: API, workers, models and tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _settings_first() -> None:
    """Read the settings before any command: an invalid value is one line per setting, exit 2
    (it was pydantic's 56-line traceback, wherever the command first read them)."""
    from pydantic import ValidationError

    from core.settings import get_settings

    try:
        get_settings()
    except ValidationError as exc:
        invalid_settings(exc)


# `drscreen --help` lists the commands in this order (groups after them)
app.add_typer(pipeline.app)
app.add_typer(serve.app)
app.add_typer(worker.app)
app.add_typer(status.app)
db.app.add_typer(backup.app)  # after upgrade, check, recheck-patients
app.add_typer(db.app, name="db")
app.add_typer(keys.app, name="keys")
app.add_typer(model.app, name="model")
data.app.add_typer(retention.app)  # after audit, agreement, export-graded
app.add_typer(data.app, name="data")


if __name__ == "__main__":  # pragma: no cover - `python -m cli.main`
    app()
