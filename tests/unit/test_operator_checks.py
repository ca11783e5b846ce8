"""What an operator gets wrong, said at start (session 18's operator review): a database whose
schema is not this code's (every upload answered 500 while /readyz said ready), invalid or
misspelt settings, a missing file store, a worker serving another release than the activated one."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from alembic import command
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.checks import warn_about_settings
from cli.main import app as cli
from core import migrate
from core.settings import get_settings
from services.app import create_app
from services.config import get_api_settings
from workers.settings import get_worker_settings


def test_schema_problem_names_what_to_do(isolated_settings: Path) -> None:
    url = get_settings().database_url
    head = migrate.head_revision()
    assert "no schema yet" in (migrate.schema_problem(url) or "")
    migrate.upgrade(url)
    assert migrate.current_revision(url) == head and migrate.schema_problem(url) is None
    command.downgrade(migrate.alembic_config(url), "-1")
    behind = migrate.schema_problem(url) or ""
    assert f"needs {head}" in behind and "drscreen db upgrade" in behind


def test_the_api_does_not_start_on_a_database_without_its_schema(isolated_settings: Path) -> None:
    with pytest.raises(RuntimeError, match="no schema yet"), TestClient(create_app()):
        pass


def test_readiness_says_when_the_schema_falls_behind(url: str) -> None:
    with TestClient(create_app()) as client:
        assert client.get("/readyz").json()["checks"]["schema"] is True
        command.downgrade(migrate.alembic_config(url), "-1")  # e.g. restored from an old backup
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["schema"] is False
        assert "schema" in ready.json()["detail"]


@pytest.mark.parametrize("command_name", ["serve", "worker"])
def test_serve_and_worker_refuse_an_unmigrated_database_in_one_line(
    isolated_settings: Path, command_name: str
) -> None:
    result = CliRunner().invoke(cli, [command_name])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert (
        message
        == f"drscreen {command_name}: not starting: the database has no schema yet: run `drscreen db upgrade`"
    )


def test_a_worker_warns_when_its_file_store_does_not_exist(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on another machine without the API's shared store: said at start (its photographs
    would be retried and then failed, tests/unit/test_workers_scoring.py)."""
    from workers.app import celery_app

    migrate.upgrade(get_settings().database_url)
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(isolated_settings / "not-mounted"))
    get_settings.cache_clear()
    started: list[list[str]] = []
    monkeypatch.setattr(celery_app, "worker_main", lambda argv: started.append(argv))
    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 0, result.output
    assert "warning: the file store" in result.output and "not-mounted" in result.output
    assert started, "the worker still starts (an embedded API creates the store on its first upload)"


def test_serve_and_worker_warn_about_a_misspelt_setting_and_a_lone_file_broker(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt DRSCREEN_ name was ignored in silence; PostgreSQL with the embedded file broker
    queued work where no worker on another machine looks."""
    from workers.app import celery_app

    migrate.upgrade(get_settings().database_url)
    monkeypatch.setenv("DRSCREEN_VISIT_WINDOW_HOUR", "0")  # ...HOURS
    monkeypatch.setenv("DRSCREEN_TEST_ANYTHING", "1")  # the tests' own names are known
    monkeypatch.setattr(celery_app, "worker_main", lambda argv: None)
    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 0, result.output
    assert "unknown setting DRSCREEN_VISIT_WINDOW_HOUR is ignored" in result.output
    assert "DRSCREEN_TEST_ANYTHING" not in result.output and "file broker" not in result.output

    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    get_settings.cache_clear()
    probe = typer.Typer()
    probe.command()(lambda: warn_about_settings("drscreen serve"))
    assert "PostgreSQL with the embedded file broker" in CliRunner().invoke(probe, []).output


def test_model_activate_pins_the_release_every_worker_serves(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.app import celery_app

    migrate.upgrade(get_settings().database_url)
    runner = CliRunner()
    assert "none activated" in runner.invoke(cli, ["model", "active"]).output
    unknown = runner.invoke(cli, ["model", "activate", "drscreen-ensemble@9.9.9"])
    assert unknown.exit_code == 2 and "cannot be served" in unknown.output
    done = runner.invoke(cli, ["model", "activate", "drscreen-ensemble@1.6.0"])
    assert done.exit_code == 0 and "active release: drscreen-ensemble@1.6.0" in done.output
    assert runner.invoke(cli, ["model", "active"]).output.strip() == "drscreen-ensemble@1.6.0"
    monkeypatch.setattr(celery_app, "worker_main", lambda argv: None)
    monkeypatch.setenv("DRSCREEN_MODEL", "drscreen-ensemble@1.5.0")
    get_settings.cache_clear()
    refused = runner.invoke(cli, ["worker"])
    assert refused.exit_code == 2
    assert "not starting: the deployment serves drscreen-ensemble@1.6.0" in refused.output
    assert "DRSCREEN_MODEL=drscreen-ensemble@1.6.0" in refused.output


def test_a_database_migrated_by_newer_code_is_served_with_a_warning(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The upgrade order is: migrate, then replace APIs and workers. Refusing a schema newer than
    the code took every old API out of the load balancer before a new one was up (the review)."""
    from sqlalchemy import text

    from core.db import session_scope

    with session_scope(url) as s:
        s.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    with caplog.at_level("WARNING"):
        assert migrate.schema_problem(url) is None
    assert "newer than this code's" in caplog.text
    with TestClient(create_app()) as client:
        assert client.get("/readyz").json()["checks"]["schema"] is True


@pytest.mark.parametrize(
    ("name", "value", "command"),
    [
        ("DRSCREEN_MAX_UPLOAD_MB", "lots", ["db", "check"]),
        ("DRSCREEN_LOG_LEVEL", "LOUD", ["db", "check"]),
        ("DRSCREEN_SCORE_CHUNK", "0", ["worker"]),
        ("DRSCREEN_RATE_LIMIT_BURST", "none", ["serve"]),
    ],
)
def test_an_invalid_setting_is_one_line(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, command: list[str]
) -> None:
    """The operator review: a pydantic traceback of 56 lines (LOG_LEVEL=LOUD: a KeyError later)."""
    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    get_api_settings.cache_clear()
    get_worker_settings.cache_clear()
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"drscreen: invalid setting {name}: "), lines


@pytest.mark.parametrize(
    ("name", "value", "command"),
    [
        ("DRSCREEN_SCORE_CHUNK", "1000", ["worker"]),
        ("DRSCREEN_EXPLAIN", "maybe", ["worker"]),
        ("DRSCREEN_MAX_ATTEMPTS", "0", ["score", "samples/16/16_left.jpg"]),
        ("DRSCREEN_RATE_LIMIT_BURST", "0", ["demo"]),
    ],
)
def test_a_part_setting_is_one_line_in_a_fresh_process(
    isolated_settings: Path, name: str, value: str, command: list[str]
) -> None:
    """The README review: in a new process `worker` imported workers.app, which reads the worker
    settings as it loads, before the check (pydantic's traceback); `score` and `demo` never checked
    the worker's or the API's settings. In-process runs hid it: the module was already imported."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, name: value}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *command],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"drscreen: invalid setting {name}: "), lines


def test_a_postgres_url_names_the_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgres://u@db/drscreen")
    get_settings.cache_clear()
    assert get_settings().database_url == "postgresql+psycopg://u@db/drscreen"
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgresql+psycopg://u@db/x")
    get_settings.cache_clear()
    assert get_settings().database_url == "postgresql+psycopg://u@db/x"
    monkeypatch.setenv("DRSCREEN_LOG_LEVEL", "debug")
    get_settings.cache_clear()
    assert get_settings().log_level == "DEBUG"


def test_the_api_describes_the_activated_release(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/models, /readyz and the model metric said the API machine's own default even when the
    deployment had activated another release."""
    from core import repository as repo
    from core.db import session_scope
    from services.modelinfo import active_ref

    settings = get_settings()
    assert active_ref(settings) == "drscreen-ensemble@1.6.0"  # newest shipped, nothing activated
    with session_scope(url) as s:
        repo.activate_release(s, "drscreen-ensemble@1.5.0")
    assert active_ref(settings) == "drscreen-ensemble@1.5.0"
    with session_scope(url) as s:
        repo.activate_release(s, "drscreen-ensemble@7.0.0")  # not on this machine
    assert active_ref(settings) is None
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["model"] is False


def test_the_api_and_the_workers_take_the_same_default_model(url: str, tmp_path: Path) -> None:
    """Nothing activated, DRSCREEN_MODEL unset: a --validation-only candidate with a higher
    version is neither what workers serve nor what the API reports (they disagreed)."""
    import json

    from ml.release import newest_ensemble
    from services.modelinfo import active_ref

    for version, n_test in (("1.1.0", 12), ("1.2.0", 0)):
        folder = tmp_path / "models" / "ensembles" / "e" / version
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"card": {"test": {"n_images": n_test}}}))
    settings = get_settings().model_copy(update={"models_dir": tmp_path / "models", "model": None})
    assert active_ref(settings) == newest_ensemble(tmp_path / "models") == "e@1.1.0"


def test_a_higher_numbered_dev_ensemble_is_not_the_default_model(tmp_path: Path) -> None:
    """The default was the highest version of any ensemble name: a drscreen-dev@9.0.0 beside the
    product's releases was what workers served and the API reported when nothing was named."""
    import json

    from ml.release import newest_ensemble
    from services.modelinfo import active_ref

    def release(name: str, version: str) -> None:
        folder = tmp_path / "models" / "ensembles" / name / version
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"card": {"test": {"n_images": 12}}}))

    settings = get_settings().model_copy(update={"models_dir": tmp_path / "models", "model": None})
    release("clinic-own", "2.0.0")
    release("clinic-own", "10.0.0")
    # no product release installed: the highest version of what is there
    assert active_ref(settings) == newest_ensemble(tmp_path / "models") == "clinic-own@10.0.0"
    release("drscreen-ensemble", "1.6.0")
    release("drscreen-ensemble", "1.10.0")
    release("drscreen-dev", "9.0.0")
    assert active_ref(settings) == newest_ensemble(tmp_path / "models") == "drscreen-ensemble@1.10.0"
    named = settings.model_copy(update={"model": "drscreen-dev@9.0.0"})
    assert active_ref(named) == "drscreen-dev@9.0.0"  # served when named


def test_workers_and_api_agree_on_version_order_and_leave_out_a_changed_release(tmp_path: Path) -> None:
    """The review of session 30: 1.6.0 and 1.6.0-hotfix tied (workers and API broke the tie
    differently), 1.7.0-rc.1 ranked level with 1.7.0, and a newest release whose manifest was
    changed was the workers' default (then refused) while the API described the one below it."""
    import json

    from ml.publish import version_key, write_sums
    from ml.release import newest_ensemble
    from services.modelinfo import active_ref

    assert version_key("1.7.0-rc.1") < version_key("1.7.0") < version_key("1.7.0+hotfix")
    assert version_key("1.7.0-rc.2") < version_key("1.7.0-rc.10") < version_key("1.7.0-rc.x")
    assert version_key("1.10.0") > version_key("1.9.9") > version_key("not-a-version")

    def release(version: str) -> Path:
        folder = tmp_path / "models" / "ensembles" / "drscreen-ensemble" / version
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"card": {"test": {"n_images": 12}}}))
        write_sums(folder)
        return folder

    settings = get_settings().model_copy(update={"models_dir": tmp_path / "models", "model": None})
    for version in ("1.6.0", "1.6.0+hotfix", "1.7.0-rc.1"):
        release(version)
    assert active_ref(settings) == newest_ensemble(tmp_path / "models") == "drscreen-ensemble@1.7.0-rc.1"
    changed = release("1.7.0")
    (changed / "manifest.json").write_text(json.dumps({"card": {"test": {"n_images": 13}}}))
    assert active_ref(settings) == newest_ensemble(tmp_path / "models") == "drscreen-ensemble@1.7.0-rc.1"


def test_one_schema_check_says_refuse_unreachable_or_fine(isolated_settings: Path) -> None:
    """One helper for `drscreen serve`/`worker` and the API's lifespan (they were near-twins)."""
    assert "port 1" in (migrate.check_schema_at_start("postgresql+psycopg://nobody@127.0.0.1:1/none") or "")
    url = get_settings().database_url
    with pytest.raises(migrate.SchemaBehind, match="no schema yet"):
        migrate.check_schema_at_start(url)
    migrate.upgrade(url)
    assert migrate.check_schema_at_start(url) is None


def test_serve_checks_the_schema_once(isolated_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`drscreen serve` checked the schema, then the app's lifespan checked it again (once per
    uvicorn worker process); the command's check is enough. uvicorn started on create_app without
    the CLI still checks (test_the_api_does_not_start_on_a_database_without_its_schema)."""
    import importlib

    import uvicorn

    migrate.upgrade(get_settings().database_url)
    real = migrate.current_revision
    checks: list[str | None] = []

    def counted(database_url: str | None = None) -> str | None:
        checks.append(database_url)
        return real(database_url)

    monkeypatch.setattr(migrate, "current_revision", counted)
    started: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: started.append((target, kw)))
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 0, result.output
    [(target, options)] = started
    assert options["factory"] is True
    module, _, name = target.partition(":")
    with TestClient(getattr(importlib.import_module(module), name)()) as client:
        assert client.get("/healthz").status_code == 200
    assert len(checks) == 1

    # a database not reachable yet: said in one line, and the API starts (/readyz tells)
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 0 and len(started) == 2, result.output
    assert "drscreen serve: database not reachable now (" in result.output
    assert "schema not checked" in result.output


def test_the_compose_worker_has_a_healthcheck_that_pings_its_node() -> None:
    """The operator review: the compose file's worker had no healthcheck. It pings the worker's
    default node name (celery@<container hostname>), so the command must not rename the node."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    worker = compose["services"]["worker"]
    check = worker["healthcheck"]
    assert check["test"][0] == "CMD-SHELL" and "inspect ping -d celery@$$HOSTNAME" in check["test"][1]
    assert "workers.app:celery_app" in check["test"][1]
    assert (check["interval"], check["timeout"]) == ("60s", "20s")
    assert not {"-n", "--hostname"} & set(worker["command"])


def test_db_check_on_a_database_behind_is_one_line(isolated_settings: Path) -> None:
    """The newcomer's walk-through: an unmigrated database made `drscreen db check` end in ~50
    lines of alembic traceback."""
    result = CliRunner().invoke(cli, ["db", "check"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "not up to date" in lines[0] and "drscreen db upgrade" in lines[0], lines
    assert CliRunner().invoke(cli, ["db", "upgrade"]).exit_code == 0
    result = CliRunner().invoke(cli, ["db", "check"])
    assert result.exit_code == 0 and "schema and migrations agree" in result.output, result.output
