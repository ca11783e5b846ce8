"""Bad input to the operator and `score` commands: one line on stderr and an exit code, never a
traceback (the CLI review). Nothing here loads the real ensemble: a bad `score` input is refused
before scoring, and the stub stands in should a regression score anyway."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from tests.unit.test_workers_scoring import StubEnsemble

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "16" / "16_left.jpg"
runner = CliRunner()


def _one_line_error(result: Result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def stub_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in ensemble: cheap even when a regression scores."""
    from workers import model

    monkeypatch.setattr(model, "_ensemble", StubEnsemble())


@pytest.fixture
def no_scoring(monkeypatch: pytest.MonkeyPatch, stub_model: None) -> list[Path]:
    """Records (and fakes) any scoring: these inputs must be refused before it starts."""
    from workers import bulk
    from workers.bulk import ScoreResult

    scored: list[Path] = []

    def fake_run(path: Path, **_: object) -> ScoreResult:
        scored.append(path)
        return ScoreResult("stub-ensemble@0.0.1", [], [])

    monkeypatch.setattr(bulk, "run", fake_run)
    return scored


def test_score_a_folder_with_an_unusable_manifest(tmp_path: Path, stub_model: None) -> None:
    folder = tmp_path / "visit"
    folder.mkdir()
    (folder / "16_left.jpg").write_bytes(SAMPLE.read_bytes())
    (folder / "manifest.csv").write_text("file,who\n16_left.jpg,16\n", encoding="utf-8")
    result = runner.invoke(app, ["score", str(folder)])
    # the folder job's own message (workers.naming.parse_manifest), as the API's job gives it
    _one_line_error(result, 2, "drscreen score: manifest.csv lacks column(s): patient_id")


def test_score_an_empty_folder_says_so(tmp_path: Path, no_scoring: list[Path]) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["score", str(tmp_path / "empty")])
    _one_line_error(result, 1, f"no photographs found in {tmp_path / 'empty'}")  # "nothing scored": 1
    assert result.stdout == ""  # no empty table


@pytest.mark.parametrize(
    "out",
    [
        "/proc/x.csv",  # no file can be made there (not even by root)
        "{tmp}/existing_dir.csv",  # a folder
        "{tmp}/a_file/x.json",  # its "folder" is a file
        "{tmp}/clash.csv",  # its per-patient file would land on a folder
    ],
)
def test_score_refuses_an_unwritable_out_before_scoring(
    tmp_path: Path, no_scoring: list[Path], out: str
) -> None:
    (tmp_path / "existing_dir.csv").mkdir()
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    (tmp_path / "clash_patients.csv").mkdir()
    result = runner.invoke(app, ["score", str(SAMPLE), "--out", out.format(tmp=tmp_path)])
    _one_line_error(result, 2, "drscreen score: cannot write the results: ")
    assert no_scoring == []  # said before scoring, not after (the results were lost)


def test_score_refuses_a_heatmap_folder_it_cannot_make(tmp_path: Path, no_scoring: list[Path]) -> None:
    (tmp_path / "res_heatmaps").write_text("x", encoding="utf-8")  # where --explain would draw
    result = runner.invoke(app, ["score", str(SAMPLE), "--out", str(tmp_path / "res.json"), "--explain"])
    _one_line_error(result, 2, f"no file can be made in {tmp_path / 'res_heatmaps'}")
    assert no_scoring == []


def test_score_still_makes_the_missing_folders_of_out(tmp_path: Path, no_scoring: list[Path]) -> None:
    out = tmp_path / "new" / "deeper" / "results.csv"
    result = runner.invoke(app, ["score", str(SAMPLE), "--out", str(out)])
    assert no_scoring == [SAMPLE] and out.is_file(), result.output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the check left nothing


def test_serve_refuses_a_port_out_of_range(isolated_settings: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn listened on 70000 - 65536 = 4464 while the log said 70000."""
    import uvicorn

    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(k["port"]))
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0  # serve would start
    for port, bound in (("70000", "less than or equal to 65535"), ("0", "greater than or equal to 1")):
        result = runner.invoke(app, ["serve", "--port", port])  # as click says any bad option
        assert result.exit_code == 2 and "Invalid value for '--port'" in result.stderr, result.output
        assert bound in result.stderr and "Traceback" not in result.output
    assert started == []
    assert runner.invoke(app, ["serve", "--port", "65535"]).exit_code == 0 and started == [65535]


def test_serve_trusts_forwarded_headers_only_from_the_proxy_it_is_told(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: behind a TLS proxy on another host the sign-in cookie was never marked
    Secure: nothing let uvicorn believe the proxy's X-Forwarded-Proto. Without the option uvicorn's
    own default stands (FORWARDED_ALLOW_IPS, else 127.0.0.1 and ::1; the review)."""
    import uvicorn

    started: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(k))
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(app, ["serve"]).exit_code == 0
    assert runner.invoke(app, ["serve", "--forwarded-allow-ips", "10.0.0.5"]).exit_code == 0
    assert runner.invoke(app, ["serve"], env={"FORWARDED_ALLOW_IPS": "10.0.0.6"}).exit_code == 0
    assert [(k["proxy_headers"], k["forwarded_allow_ips"]) for k in started] == [
        (True, None),
        (True, "10.0.0.5"),
        (True, "10.0.0.6"),
    ]


@pytest.mark.parametrize("clinic", ["", "   "])
def test_keys_create_refuses_a_blank_clinic_in_one_line(isolated_settings: Path, clinic: str) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["keys", "create", "--clinic", clinic])
    _one_line_error(result, 2, "drscreen keys create: clinic name is empty")
    assert "drs_" not in result.stdout


def test_keys_create_notes_a_clinic_name_that_cannot_be_a_folder(isolated_settings: Path) -> None:
    """The README review: "North/West" was accepted silently, and DRSCREEN_IMPORT_PER_CLINIC then
    refuses every folder job of that clinic."""
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["keys", "create", "--clinic", "North/West"])
    assert result.exit_code == 0 and result.stdout.startswith("drs_")
    assert "cannot be a folder name" in result.stderr
    plain = runner.invoke(app, ["keys", "create", "--clinic", "North"])
    assert plain.exit_code == 0 and "folder name" not in plain.stderr


def test_keys_revoke_of_a_huge_id_matches_nothing(isolated_settings: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["keys", "revoke", "9" * 30])  # was SQLite's OverflowError
    _one_line_error(result, 1, "no active key matched")
    result = runner.invoke(app, ["keys", "revoke", "9" * 5000])  # int() refuses over 4300 digits
    _one_line_error(result, 1, "no active key matched")


@pytest.mark.parametrize("ref", ["", "  "])
def test_model_activate_refuses_a_blank_release(isolated_settings: Path, ref: str) -> None:
    """`drscreen model activate "$REF"` with REF unset pinned the newest shipped release."""
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["model", "activate", ref])
    _one_line_error(result, 2, "drscreen model activate: give the release as NAME@VERSION")
    assert runner.invoke(app, ["model", "active"]).stdout.startswith("none activated")


@pytest.mark.parametrize("revision", ["nonexistentrev", "-5"])
def test_db_upgrade_to_an_unknown_revision_is_one_line(isolated_settings: Path, revision: str) -> None:
    result = runner.invoke(app, ["db", "upgrade", "--", revision])
    _one_line_error(result, 2, "drscreen db upgrade: ")
    assert revision in result.stderr


@pytest.mark.parametrize("revision", ["head+5", "", " "])
def test_db_upgrade_to_an_impossible_revision_is_one_line(isolated_settings: Path, revision: str) -> None:
    """The review: alembic raised AssertionError for these (a traceback)."""
    _one_line_error(runner.invoke(app, ["db", "upgrade", "--", revision]), 2, "drscreen db upgrade: ")


def test_evaluate_refuses_a_folder_as_labels_in_one_line(tmp_path: Path) -> None:
    """The contract review: a folder as --labels was an IsADirectoryError traceback."""
    result = runner.invoke(app, ["evaluate", "--labels", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is a directory" in " ".join(result.output.replace("│", " ").split())  # rich's box wraps


def test_train_with_a_broken_config_file_is_one_line(tmp_path: Path) -> None:
    """The contract review: a config that is not TOML was a TOMLDecodeError traceback."""
    config = tmp_path / "bad.toml"
    config.write_text("name = [\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    _one_line_error(result, 2, "is not a valid TOML file")
