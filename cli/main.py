"""``drscreen``: the one front door. A thin dispatcher: every heavy import happens inside the
command that needs it, so ``drscreen --help`` stays instant.

Commands implemented elsewhere are looked up lazily (module:function) and called with plain values.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="drscreen",
    help="Diabetic-retinopathy screening: API, workers, models and tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations), backups and restores.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the clinics.", no_args_is_help=True)
model_app = typer.Typer(help="The release the whole deployment serves.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(model_app, name="model")


def _load(target: str) -> Any:
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


@app.callback()
def _settings_first() -> None:
    """Read the settings before any command: an invalid value is one line per setting, exit 2
    (it was pydantic's 56-line traceback, wherever the command first read them)."""
    from pydantic import ValidationError

    from core.settings import get_settings

    try:
        get_settings()
    except ValidationError as exc:
        _invalid_settings(exc)


def _invalid_settings(exc: Any) -> None:
    for error in exc.errors():
        name = "DRSCREEN_" + "_".join(str(part) for part in error["loc"]).upper()
        typer.echo(f"drscreen: invalid setting {name}: {error['msg']}", err=True)
    raise typer.Exit(code=2)


API_SETTINGS, WORKER_SETTINGS = "services.config:get_api_settings", "workers.settings:get_worker_settings"


def _check_part_settings(target: str) -> None:
    """The API's or the workers' own settings (``module:getter``), checked the same way."""
    from pydantic import ValidationError

    try:
        _load(target)()
    except ValidationError as exc:
        _invalid_settings(exc)


def _finish(result: Any) -> None:
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise typer.Exit(code=result)


# ------------------------------------------------------------------------------ the product's jobs


@app.command()
def demo() -> None:
    """Score the bundled sample patients through the real pipeline (embedded: no servers needed)."""
    # the demo runs the API and a worker: their settings too, in one line each, before either starts
    _check_part_settings(API_SETTINGS)
    _check_part_settings(WORKER_SETTINGS)
    _finish(_load("services.demo:run_demo")())


@app.command()
def score(
    path: Path = typer.Argument(..., exists=True, help="An image or a folder of images."),
    out: Path | None = typer.Option(None, "--out", help="Write results to FILE.csv or FILE.json."),
    explain: bool = typer.Option(False, "--explain", help="Also write Grad-CAM heatmaps."),
    submission: bool = typer.Option(
        False,
        "--submission",
        help="Write --out as a Kaggle-style ID,TARGET file (the default for names ending in submission.csv).",
    ),
) -> None:
    """Score one image or a folder (embedded), with per-image and per-patient results."""
    if submission and out is None:
        raise typer.BadParameter("--submission needs --out FILE.csv", param_hint="--submission")
    _check_part_settings(WORKER_SETTINGS)
    _finish(_load("workers.bulk:score_path")(path, out, explain, submission=True if submission else None))


@app.command()
def evaluate(
    labels: Path = typer.Option(
        ..., "--labels", exists=True, dir_okay=False, readable=True, help="CSV with columns image, grade."
    ),
    model: str | None = typer.Option(
        None, "--model", help="An ensemble or one member, NAME@VERSION (default: what the workers serve)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON line (last)."),
    report: Path | None = typer.Option(None, "--report", help="Write a report with plots to DIR."),
    runtime: str = typer.Option(
        "torch",
        "--runtime",
        help="torch (float32, the model card's figures), onnx or openvino (what a CPU worker runs).",
    ),
) -> None:
    """Score a labelled set and print metrics (QWK, accuracy, referable sensitivity/specificity/AUC)."""
    _finish(_load("ml.evaluation:evaluate_cli")(labels, model, as_json, report, runtime))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", exists=True, dir_okay=False, help="Training config file."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
    settings: list[str] = typer.Option(
        [], "--set", help="Override a config value, e.g. --set threads=1 --set stage1.epochs=2 (TOML values)."
    ),
) -> None:
    """Train a model from a config; writes a run folder under runs/."""
    import logging

    try:
        overrides = _load("ml.training.config:parse_overrides")(settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ml.training.config import ConfigError
    from ml.training.train import ResumeError

    try:
        run_dir = _load("ml.training.train:train_from_config")(config, resume=resume, overrides=overrides)
    except (ConfigError, ResumeError, FileNotFoundError) as exc:
        # a config typo, a wrong --resume folder, a missing data folder: one line, nothing started
        typer.echo(f"drscreen train: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(run_dir)  # the last stdout line: scripts take the run folder from it


# --help goes through to ml.export's own parser, which knows the subcommands and their options
@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def export(ctx: typer.Context) -> None:
    """Turn a training run into a released model (arguments are passed to ml.export)."""
    _finish(_load("ml.export:export_cli")(list(ctx.args)))


@app.command()
def bench(
    as_json: bool = typer.Option(False, "--json", help="End with the figures as one JSON line."),
    quick: bool = typer.Option(False, "--quick", help="A small run (a minute or two): smoke check only."),
) -> None:
    """Measure scoring throughput and latency (docs/performance.md)."""
    _finish(_load("cli.bench:run_bench")(as_json, quick))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    # click refuses a port out of range (exit 2): uvicorn took 70000 as 70000 - 65536 = 4464
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    workers: int = typer.Option(1, "--workers", help="Uvicorn worker processes."),
    forwarded_allow_ips: str | None = typer.Option(
        None,
        "--forwarded-allow-ips",
        envvar="FORWARDED_ALLOW_IPS",
        help="Addresses of the TLS proxy whose X-Forwarded-Proto/-For are trusted (comma-separated, "
        "'*' for any; default uvicorn's, 127.0.0.1 and ::1): behind a proxy on another host the "
        "sign-in cookie is marked Secure only then.",
    ),
) -> None:
    """Run the HTTP API (uvicorn, services.app:create_app)."""
    _load("services.app:create_app")  # clear message when the API is not installed
    import uvicorn

    from core.settings import get_settings

    _check_part_settings(API_SETTINGS)
    _warn_about_settings("drscreen serve")
    _refuse_other_schema("drscreen serve")
    _refuse_pending_replay("drscreen serve")
    with _metrics_shared_by(workers):
        uvicorn.run(
            "services.app:create_app_for_cli",  # checked just above: the app does not check again
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=get_settings().log_level.lower(),
            proxy_headers=True,
            # None: uvicorn's own default (FORWARDED_ALLOW_IPS, else 127.0.0.1 and ::1)
            forwarded_allow_ips=forwarded_allow_ips,
        )


@contextlib.contextmanager
def _metrics_shared_by(workers: int) -> Iterator[None]:
    """Several API processes on one port: their request metrics go to one fresh folder that every
    scrape sums (``services.metrics.MULTIPROC_ENV``); one given by the environment is kept."""
    import os
    import shutil
    import tempfile

    from services.metrics import MULTIPROC_ENV

    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="drscreen-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


#: image.claimed_by and worker_heartbeat.node hold a Celery node name (String(255)).
NODE_NAME_MAX = 255


@app.command()
def worker(
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Worker processes."),
    queues: str = typer.Option("scoring,explain", "--queues", "-Q", help="Comma-separated queues."),
    loglevel: str = typer.Option(None, "--loglevel", "-l", help="Default: DRSCREEN_LOG_LEVEL."),
    hostname: str = typer.Option(
        None,
        "--hostname",
        "-n",
        help="Celery node name (default celery@<host>); give each worker on one host its own.",
    ),
    celery_app: str = typer.Option(
        "workers.app:celery_app", "--app", hidden=True, help="module:attr of the Celery app."
    ),
) -> None:
    """Run a Celery worker consuming the scoring and explain queues."""
    from core.settings import get_settings

    settings = get_settings()
    if hostname and len(hostname) > NODE_NAME_MAX:  # claims and heartbeats store it: PostgreSQL refused
        typer.echo(f"drscreen worker: --hostname is longer than {NODE_NAME_MAX} characters", err=True)
        raise typer.Exit(2)
    # before the app's import: workers.app reads the worker settings as it is imported (a bad value
    # was pydantic's traceback)
    _check_part_settings(WORKER_SETTINGS)
    application = _load(celery_app)
    if celery_app == "workers.app:celery_app":  # (test apps without a database: --app)
        from workers.model import check_release

        try:
            ref = check_release(settings)
        except (OSError, ValueError, KeyError) as exc:
            typer.echo(f"drscreen worker: the model cannot be loaded, not starting: {exc}", err=True)
            raise typer.Exit(2) from exc
        _warn_about_settings("drscreen worker")
        _refuse_other_schema("drscreen worker")
        _refuse_pending_replay("drscreen worker")
        _refuse_other_release(ref)
        if not Path(settings.store_path).is_dir():
            # not fatal (an embedded API creates it on its first upload), but on a machine of its
            # own this is the usual mistake: photographs would be retried, then failed
            typer.echo(
                f"drscreen worker: warning: the file store {settings.store_path} does not exist; "
                "photographs are read from the folder the API stores them in (DRSCREEN_STORE_DIR, "
                "shared between machines)",
                err=True,
            )
        typer.echo(f"drscreen worker: serving {ref}")
    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        loglevel or settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    application.worker_main(argv=argv)


#: DRSCREEN_ names read outside the settings classes (scripts, the bench, the tests' own)
_OTHER_NAMES = {"ONNX_CACHE", "BENCH_PHOTOS", "BENCH_CONCURRENCY", "DATA", "BIN"}


def _warn_about_settings(command: str) -> None:
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


def _refuse_other_schema(command: str) -> None:
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


def _refuse_pending_replay(command: str) -> None:
    """Exit 2 while a restore's replay of the restore ledger has not run (core.ledger): patients
    erased after the backup would be served again."""
    from core.backup import pending_problem
    from core.settings import get_settings

    problem = pending_problem(get_settings().store_path)
    if problem is not None:
        typer.echo(f"{command}: not starting: {problem}", err=True)
        raise typer.Exit(2)


def _refuse_other_release(ref: str) -> None:
    """Exit 2 when the deployment has an active release (``drscreen model activate``) and this
    worker would serve another: a patient's result comes from one release."""
    from sqlalchemy.exc import OperationalError

    from core import repository as repo
    from core.db import session_scope

    try:
        with session_scope() as session:
            active = repo.other_active_release(session, ref)
    except OperationalError:
        return  # not reachable now: said by _refuse_other_schema; each task checks again
    if active is not None:
        typer.echo(
            f"drscreen worker: not starting: the deployment serves {active} (drscreen model "
            f"activate) and this worker would serve {ref}: set DRSCREEN_MODEL={active}",
            err=True,
        )
        raise typer.Exit(2)


# -------------------------------------------------------------------------------------- model


@model_app.command("activate")
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
        checked = _load("ml.inference:check_release")(ref, get_settings().models_dir)
    except (OSError, ValueError, KeyError) as exc:
        typer.echo(f"drscreen model activate: {ref} cannot be served: {exc}", err=True)
        raise typer.Exit(2) from exc
    with _db_errors(), session_scope() as session:
        repo.activate_release(session, checked)
    typer.echo(f"active release: {checked}")


@model_app.command("active")
def model_active() -> None:
    """Print the release the deployment serves (none: each worker serves its DRSCREEN_MODEL)."""
    from core import repository as repo
    from core.db import session_scope

    with _db_errors(), session_scope() as session:
        active = repo.active_release(session)
    typer.echo(active or "none activated: each worker serves its own DRSCREEN_MODEL")


# ------------------------------------------------------------------------------------- status


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Show the active release, the queue and the workers (from their heartbeats), and WARN when a
    worker serves another release or a setting that must be alike differs (between workers, or
    from this machine's DRSCREEN_ settings). Exit 0: all well; 1: a warning; 2: database problem."""
    import json

    from core.migrate import SchemaBehind, check_schema_at_start
    from core.settings import get_settings

    try:
        unreachable = check_schema_at_start()
    except SchemaBehind as exc:
        typer.echo(f"drscreen status: {exc}", err=True)
        raise typer.Exit(2) from None
    if unreachable:  # one line, as _db_errors says it
        url = _redact(get_settings().database_url)
        typer.echo(f"drscreen: cannot use the database at {url}: {unreachable}", err=True)
        raise typer.Exit(2)
    with _db_errors():
        report = _load("cli.status:gather")()
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for line in _load("cli.status:render")(report):
            typer.echo(line)
    if report["warnings"]:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------- db


@db_app.command("upgrade")
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
        with _db_errors():
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
    typer.echo(f"database at {_redact(url)} is at {current_revision(url) or 'base (empty)'}")
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

    with _backup_errors("upgrade"):
        _replayed_lines(replay_ledger(settings.database_url, settings.store_path))


@db_app.command("check")
def db_check() -> None:
    """Fail when core.tables and the migrations differ (alembic check)."""
    from alembic.util.exc import CommandError

    from core.migrate import check

    try:
        with _db_errors():
            check()
    except CommandError as exc:  # alembic's verdict, not a crash: one line (was ~50 of traceback)
        reason = (str(exc).strip().splitlines() or ["alembic check failed"])[0][:300]
        if "not up to date" in reason:
            reason += " (run `drscreen db upgrade`)"
        typer.echo(f"drscreen db check: {reason}", err=True)
        raise typer.Exit(1) from None
    typer.echo("schema and migrations agree")


@db_app.command("recheck-patients")
def db_recheck_patients(
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would change; record nothing."),
) -> None:
    """Apply the current patient rule to results recorded before it (once, after an upgrade)."""
    from cli.recheck import recheck_patients

    with _db_errors():
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
    )
    if summary.no_release:
        typer.echo(
            "NOTE: not checked, release not under the models folder: "
            + ", ".join(sorted(summary.no_release)),
            err=True,
        )


def _file_progress(items: Any, total: int, what: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="file", disable=total < 100, file=sys.stderr)


@contextlib.contextmanager
def _backup_errors(command: str) -> Iterator[None]:
    """A backup that cannot be done, or a database that cannot be used: one line, exit 2."""
    from core.backup import BackupError

    try:
        with _db_errors():
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


@db_app.command("backup")
def db_backup(
    folder: Path = typer.Argument(..., help="Folder to write (a second backup there copies only new files)."),
    force: bool = typer.Option(False, "--force", help=_FORCE_HELP),
) -> None:
    """Back up the database and the stored photographs and heatmaps it names, while the service runs."""
    from core.backup import take_backup
    from core.settings import get_settings

    settings = get_settings()
    with _backup_errors("backup"):
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


@db_app.command("restore")
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
    with _backup_errors("restore"):
        manifest = read_manifest(folder)
    taken = manifest.get("taken_at")
    typer.echo(
        f"restoring the snapshot of {taken} into the database at {_redact(settings.database_url)} "
        f"and the store {settings.store_path}"
    )
    if not yes:
        _confirm("Replace everything in that database with the backup?", refused="nothing restored")
    with _backup_errors("restore"):
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
        _replayed_lines(report.replayed)
    typer.echo(
        f"NOTE: everything accepted after {taken} is gone (clinics re-send it), API keys created since "
        "too; staff sign in again",
        err=True,
    )
    typer.echo("run `drscreen db upgrade` if this release's schema is newer, then start the API and workers")


def _replayed_lines(done: Any) -> None:
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


@db_app.command("replay-ledger")
def db_replay_ledger() -> None:
    """Erase again the patients and revoke again the API keys the store's ledger records and the
    database lacks (after restoring an older backup and `drscreen db upgrade`; a restore does it
    itself otherwise). Running it again changes nothing."""
    from core.backup import replay_ledger
    from core.settings import get_settings

    _refuse_other_schema("drscreen db replay-ledger")
    settings = get_settings()
    with _backup_errors("replay-ledger"):
        done = replay_ledger(settings.database_url, settings.store_path)
    _replayed_lines(done)


@db_app.command("verify-backup")
def db_verify_backup(folder: Path = typer.Argument(..., help="A folder `drscreen db backup` wrote.")) -> None:
    """Read a backup back: every stored file must still hash to its name, the dump and the key must
    be there. Changes nothing; exit 1 when anything is wrong."""
    from core.backup import verify_backup

    with _backup_errors("verify-backup"):
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


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (created when new)."),
    label: str | None = typer.Option(None, "--label", help="A note to recognise the key."),
) -> None:
    """Create an API key for a clinic and print it ONCE (only its hash is stored)."""
    from core import repository as repo
    from core.db import session_scope
    from core.errors import InvalidInput

    try:
        with _db_errors(), session_scope() as session:
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


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="Key id, key prefix or the key itself.")) -> None:
    """Revoke an API key (also where the restore ledger cannot be written: then with a WARNING)."""
    from core.errors import Unavailable
    from core.ledger import store_problem
    from core.settings import get_settings

    with _db_errors():
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


@keys_app.command("list")
def keys_list(clinic: str | None = typer.Option(None, "--clinic")) -> None:
    """List keys (id, prefix, clinic, revoked)."""
    from core import repository as repo
    from core.db import session_scope

    with _db_errors(), session_scope() as session:
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


# --------------------------------------------------------------------------------------- data

data_app = typer.Typer(
    help="Erase a patient's data; enforce a retention period; export the audit trail; graders' agreement.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


#: The longest retention period ``data purge`` takes (about 1,000 years).
MAX_RETENTION_DAYS = 365_000


def _operator() -> str:
    """Who ran a data command, for the audit row: the operating-system user."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name (e.g. a container's numeric uid)
        return "cli"


def _clinic_id(command: str, name: str) -> int:
    from core import repository as repo
    from core.db import session_scope

    with _db_errors(), session_scope() as session:
        clinic = repo.get_clinic_by_name(session, name)
        found = clinic.id if clinic is not None else None
    if found is None:
        typer.echo(f"{command}: no clinic {name!r} (as named by `drscreen keys create --clinic`)", err=True)
        raise typer.Exit(2)
    return found


def _retention(command: str, run: Any, *, commit: bool) -> tuple[Any, int]:
    """Run ``run(session)`` (core.retention) in one transaction; commit and then remove the files
    nothing references any more, or roll back (a dry run: the counts are the real run's).
    Returns (outcome, files removed)."""
    from core import retention
    from core.db import get_sessionmaker
    from core.errors import Conflict, Unavailable
    from core.settings import get_settings
    from core.store import FileStore

    with _db_errors():
        session = get_sessionmaker()()
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
            typer.echo(f"{command}: {_operator_text(exc)}", err=True)
            raise typer.Exit(2) from None
        finally:
            session.rollback()
            session.close()


def _print_counts(outcome: Any, files: int, files_label: str) -> None:
    for table, n in outcome.rows.items():
        typer.echo(f"  {table:<18}{n:>8}")
    typer.echo(f"  {files_label:<18}{files:>8}")


def _confirm(question: str, refused: str = "nothing erased") -> None:
    if not typer.confirm(question, default=False):
        typer.echo(refused, err=True)
        raise typer.Exit(1)


def _period(command: str, start: Any, end: Any) -> None:
    """An empty period is a mistake, not an empty answer (the API answers 422)."""
    if start is not None and end is not None and start >= end:
        typer.echo(f"{command}: --since must be before --until", err=True)
        raise typer.Exit(2)


def _utc_day(value: str | None, option: str) -> Any:
    """``YYYY-MM-DD`` as midnight UTC, or None; a malformed date is one line, exit 2."""
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        typer.echo(f"drscreen data: {option} takes a date as YYYY-MM-DD, not {value!r}", err=True)
        raise typer.Exit(2) from None


@data_app.command("audit")
def data_audit(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (as given to `keys create`)."),
    patient_id: str | None = typer.Option(
        None, "--patient", help="Only this patient's rows (erased: the erasure)."
    ),
    since: str | None = typer.Option(None, "--since", help="From this day on (YYYY-MM-DD, UTC)."),
    until: str | None = typer.Option(
        None, "--until", help="Before this day, which is left out (YYYY-MM-DD, UTC)."
    ),
    out: Path | None = typer.Option(None, "--out", help="CSV file to write (default: standard output)."),
) -> None:
    """The clinic's audit trail as CSV: uploads, reads, erasures and purges, who (API key id,
    prefix, label) and when, oldest first."""
    from core import repository as repo
    from core.audit_export import NoDeploymentKey, write_audit_csv
    from core.db import session_scope

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    if out is not None:
        _check_out_file(out, "drscreen data audit")
    notes: list[str] = []
    with _db_errors(), session_scope() as session:
        found = repo.get_clinic_by_name(session, clinic)
        if found is None:
            typer.echo(f"no clinic {clinic!r}", err=True)
            raise typer.Exit(code=1)
        try:
            with contextlib.ExitStack() as stack:
                fh = (
                    sys.stdout
                    if out is None
                    else stack.enter_context(open(out, "w", newline="", encoding="utf-8"))
                )
                n = write_audit_csv(
                    session, fh, found.id, patient_id=patient_id, since=start, until=end, notes=notes
                )
        except NoDeploymentKey as exc:
            typer.echo(f"drscreen data audit: {exc}", err=True)
            raise typer.Exit(2) from None
    for note in notes:
        typer.echo(f"NOTE: {note}", err=True)
    typer.echo(f"{n} audit row(s)" + (f" written to {out}" if out else ""), err=True)


def _check_out_file(out: Path, command: str) -> None:
    """One line (exit 2) when ``out`` cannot be written (core.store.outputs_problem; its missing
    folders are made), before the command reads anything (the README review: tracebacks)."""
    from core.store import outputs_problem

    problem = outputs_problem([out])
    if problem is not None:
        typer.echo(f"{command}: cannot write {out}: {problem}", err=True)
        raise typer.Exit(2)


@data_app.command("agreement")
def data_agreement(
    clinic: str | None = typer.Option(None, "--clinic", help="One clinic (default: every clinic)."),
    model: str | None = typer.Option(
        None, "--model", help="One release's gradings (default: the grades the results report)."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Photographs received from this day (YYYY-MM-DD, UTC)."
    ),
    until: str | None = typer.Option(None, "--until", help="... and before this day, left out (YYYY-MM-DD)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the text."),
) -> None:
    """How a release's grades agree with the graders' grades recorded by the clinics
    (`PUT /v1/images/{id}/grader-grade`): kappa, confusion matrix, referral sensitivity and
    specificity with 95% intervals, and the referable photographs the model missed."""
    from core import agreement as agreement_of
    from core.db import session_scope
    from core.errors import NotFound
    from core.settings import get_settings

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    _period("drscreen data agreement", start, end)
    clinic_id = _clinic_id("drscreen data agreement", clinic) if clinic is not None else None
    with _db_errors(), session_scope() as session:
        try:
            release = agreement_of.release_named(session, model)
        except NotFound as exc:
            typer.echo(f"drscreen data agreement: {exc.message}", err=True)
            raise typer.Exit(2) from None
        percent = get_settings().grader_sample_percent
        result = agreement_of.agreement(
            session, clinic_id, release, since=start, until=end, sample_percent=percent
        )
    if as_json:
        typer.echo(result.model_dump_json())
        return
    for line in agreement_of.describe(result):
        typer.echo(line)


@data_app.command("export-graded")
def data_export_graded(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (as given to `keys create`)."),
    out: Path = typer.Option(..., "--out", help="Folder to make (must not exist, or be empty)."),
    since: str | None = typer.Option(
        None, "--since", help="Photographs received from this day (YYYY-MM-DD, UTC)."
    ),
    until: str | None = typer.Option(None, "--until", help="... and before this day, left out (YYYY-MM-DD)."),
) -> None:
    """The clinic's photographs that graders graded, as a folder `drscreen evaluate --labels
    OUT/labels.csv` reads (images/, labels.csv with the grader's grade; ungradable.csv). It holds
    patient photographs and ids: keep it as you keep the database. Audited."""
    from core.db import session_scope
    from core.graded_export import ExportRefused, export_graded
    from core.settings import get_settings
    from core.store import FileStore

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    _period("drscreen data export-graded", start, end)
    clinic_id = _clinic_id("drscreen data export-graded", clinic)
    store = FileStore(get_settings().store_path)
    with _db_errors(), session_scope() as session:
        try:
            summary = export_graded(session, store, clinic_id, out, since=start, until=end, by=_operator())
        except (ExportRefused, OSError) as exc:
            typer.echo(f"drscreen data export-graded: {exc}", err=True)
            raise typer.Exit(2) from None
    if summary.missing_files:
        typer.echo(
            f"WARNING: {len(summary.missing_files)} photograph(s) missing from the store, left out: "
            + ", ".join(summary.missing_files[:10]),
            err=True,
        )
    typer.echo(
        f"{summary.labelled} graded photograph(s) in {out / 'labels.csv'}, {summary.ungradable} the "
        f"graders found ungradable in {out / 'ungradable.csv'}; evaluate with: drscreen evaluate "
        f"--labels {out / 'labels.csv'}",
        err=True,
    )


@data_app.command("erase")
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
    _refuse_other_schema(command)
    clinic_id = _clinic_id(command, clinic)

    def run(session: Any, *, forced: bool = force) -> Any:
        return retention.erase_patient(session, clinic_id, patient_id, force=forced, by=_operator())

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
        _confirm(f"Erase patient {patient_id!r} of clinic {clinic!r} as listed above?")
    outcome, removed = _retention(command, run, commit=True)
    if not outcome.found:
        typer.echo(f"no patient {patient_id!r} in clinic {clinic!r}: nothing to erase (0 rows)")
        return
    typer.echo(f"erased patient {patient_id!r} of clinic {clinic!r}: {outcome.total_rows} rows")
    _print_counts(outcome, removed, "files removed")


@data_app.command("purge")
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
    _refuse_other_schema(command)
    clinic_id = _clinic_id(command, clinic) if clinic is not None else None
    cutoff = utcnow() - timedelta(days=older_than)

    def run(session: Any) -> Any:
        return retention.purge_before(session, cutoff, clinic_id, by=_operator())

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
        _confirm("Delete all of the above?")
    outcome, removed = _retention(command, run, commit=True)
    typer.echo(f"purged ({rule}): {outcome.total_rows} rows")
    _print_counts(outcome, removed, "files removed")
    if outcome.skipped_patients:
        typer.echo(f"  {outcome.skipped_patients} patient(s) skipped: photographs still being scored")


def _operator_text(exc: Any) -> str:
    """What an operator is told of a domain error: the detail a clinic is not given, if any
    (core.ledger.StoreRefused names the store's paths and keys)."""
    return str(getattr(exc, "operator_detail", None) or exc.message)


class _db_errors:
    """Turn a missing schema or an unreachable database into a one-line message, not a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from core.errors import Unavailable

        if isinstance(exc, Unavailable):  # e.g. the restore ledger cannot be written: nothing changed
            typer.echo(f"drscreen: {_operator_text(exc)}", err=True)
            raise typer.Exit(code=2)
        if (isinstance(exc, OperationalError | ProgrammingError) and "no such table" in str(exc)) or (
            isinstance(exc, ProgrammingError) and "does not exist" in str(exc)
        ):
            typer.echo("drscreen: the database has no schema yet; run `drscreen db upgrade`.", err=True)
            raise typer.Exit(code=2)
        if isinstance(exc, OperationalError):
            from core.settings import get_settings

            first = str(exc.orig or exc).strip().splitlines()[0][:300]
            url = _redact(get_settings().database_url)
            typer.echo(f"drscreen: cannot use the database at {url}: {first}", err=True)
            raise typer.Exit(code=2)


if __name__ == "__main__":  # pragma: no cover - `python -m cli.main`
    app()
