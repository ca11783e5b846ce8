from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

CONTRACT_COMMANDS = ["demo", "score", "evaluate", "train", "export", "bench", "serve", "worker", "db", "keys"]
runner = CliRunner()


def test_help_lists_every_contract_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in CONTRACT_COMMANDS:
        assert name in result.output


@pytest.mark.parametrize(
    "argv",
    [[c, "--help"] for c in CONTRACT_COMMANDS]
    + [["db", "upgrade", "--help"], ["keys", "create", "--help"], ["keys", "revoke", "--help"]],
)
def test_each_command_has_help(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output


def test_contract_options_exist() -> None:
    assert "--out" in runner.invoke(app, ["score", "--help"]).output
    ev = runner.invoke(app, ["evaluate", "--help"]).output
    assert all(opt in ev for opt in ("--labels", "--model", "--json", "--report"))
    assert "--concurrency" in runner.invoke(app, ["worker", "--help"]).output
    serve = runner.invoke(app, ["serve", "--help"]).output
    assert "--host" in serve and "--port" in serve


def test_help_imports_nothing_heavy() -> None:
    """What keeps ``drscreen --help`` quick: the CLI module loads no heavy library (its time is
    not asserted here: speed is for benchmarks, not the test suite)."""
    code = (
        "import sys; import cli.main; "
        "heavy=[m for m in ('torch','sqlalchemy','celery','fastapi','numpy') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_part_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cli.bench", None)  # import of it raises ImportError
    result = runner.invoke(app, ["bench"])
    assert result.exit_code != 0


def test_keys_create_and_revoke(isolated_settings: Path) -> None:
    assert runner.invoke(app, ["keys", "create", "--clinic", "C"]).exit_code == 2  # no schema yet
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    created = runner.invoke(app, ["keys", "create", "--clinic", "C"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    assert key.startswith("drs_") and len(key) > 30
    from core import repository as repo
    from core.db import session_scope

    with session_scope() as s:
        row = repo.authenticate_api_key(s, key)
        assert row is not None and row.clinic.name == "C" and row.key_hash != key
    assert runner.invoke(app, ["keys", "revoke", key]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", key]).exit_code == 1


def test_score_submission_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import bulk

    calls: list[tuple[object, ...]] = []

    def fake_score_path(*args: object, **kwargs: object) -> int:
        calls.append((*args, kwargs))
        return 0

    monkeypatch.setattr(bulk, "score_path", fake_score_path)
    photo = tmp_path / "1_left.jpg"
    photo.write_bytes(b"x")
    out = tmp_path / "grades.csv"
    assert runner.invoke(app, ["score", str(photo), "--out", str(out), "--submission"]).exit_code == 0
    assert runner.invoke(app, ["score", str(photo), "--out", str(out)]).exit_code == 0
    # Without the flag the file name decides (None); with it the Kaggle format is forced.
    assert [c[-1] for c in calls] == [{"submission": True}, {"submission": None}]
    result = runner.invoke(app, ["score", str(photo), "--submission"])
    assert result.exit_code != 0 and len(calls) == 2


def test_worker_refuses_to_start_without_its_model(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose model cannot load used to start, take photographs off the queue and leave
    them ``running``: it now stops before consuming anything, saying why."""
    from core.settings import get_settings

    monkeypatch.setenv("DRSCREEN_MODEL", "drscreen-ensemble@9.9.9")
    get_settings.cache_clear()
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "cannot be loaded" in result.output and "9.9.9" in result.output


def test_score_and_export_name_a_missing_model_in_one_line(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ML audit: an unknown DRSCREEN_MODEL for `score`, an unknown member for `export
    ensemble`, were tracebacks."""
    from core.settings import get_settings

    samples = Path(__file__).resolve().parents[2] / "samples" / "16"
    monkeypatch.setenv("DRSCREEN_MODEL", "drscreen-ensemble@9.9.9")
    get_settings.cache_clear()
    result = runner.invoke(app, ["score", str(samples)])
    assert result.exit_code == 2 and "cannot be loaded" in result.output and "9.9.9" in result.output
    argv = ["export", "ensemble", "--member", "nope@1.0.0", "--name", "x", "--version", "0.0.1"]
    result = runner.invoke(app, [*argv, "--models-dir", str(tmp_path)])
    assert result.exit_code == 2 and "member nope@1.0.0 cannot be loaded" in result.output
    assert not (tmp_path / "ensembles").exists()


def test_worker_checks_the_shipped_release(isolated_settings: Path) -> None:
    from workers.model import check_release

    assert check_release().startswith("drscreen-ensemble@")


def test_an_unreachable_database_is_one_line_not_a_traceback(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("DRSCREEN_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    get_settings.cache_clear()
    for argv in (["keys", "list"], ["db", "upgrade"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "cannot use the database at postgresql+psycopg://postgres@127.0.0.1:1/nowhere" in result.output
        assert "Traceback" not in result.output


def test_db_upgrade_says_where_the_database_is(isolated_settings: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["db", "upgrade", "base"])  # an upgrade never goes back
    assert result.exit_code == 0 and "is at base" not in result.output


def test_export_help_reaches_its_subcommands() -> None:
    """`drscreen export onnx --help` used to print the generic export help (only -h worked)."""
    result = runner.invoke(app, ["export", "onnx", "--help"])
    assert result.exit_code == 0 and "--quantize" in result.output
