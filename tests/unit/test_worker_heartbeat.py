"""Worker heartbeats and `drscreen status` (docs/reliability.md listed "settings that must be alike
are not compared between processes" as a known gap; an operator could not list the workers).

On SQLite; the real worker writing its row is tests/integration/test_worker_heartbeat_pg.py. Times
are passed in: nothing here waits on the clock except the timer test, which polls."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app as cli
from core import heartbeat as hb
from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.tables import WorkerHeartbeat, utcnow
from tests.api_support import make_key
from workers import heartbeat as worker_hb
from workers.settings import get_worker_settings

SHIPPED = "drscreen-ensemble@1.6.0"  # the newest shipped release: what a worker serves by default
T0 = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _fresh_worker_settings() -> Iterator[None]:
    get_worker_settings.cache_clear()
    yield
    get_worker_settings.cache_clear()


def _settings_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(f"DRSCREEN_{name.upper()}", value)
    get_settings.cache_clear()
    get_worker_settings.cache_clear()


def _heartbeat(node: str = "celery@a", **kw: Any) -> worker_hb.Heartbeat:
    # started now: `status` warns about a live worker that has not loaded its model for 10 minutes
    kw.setdefault("started_at", utcnow())
    kw.setdefault("concurrency", 2)
    kw.setdefault("interval_s", 60.0)
    return worker_hb.Heartbeat(node, **kw)


def _rows(url: str) -> list[dict[str, Any]]:
    with session_scope(url) as s:
        return [
            {c.name: getattr(row, c.name) for c in WorkerHeartbeat.__table__.columns}
            for row in repo.worker_heartbeats(s)
        ]


def _row(node: str, seen_ago_s: float, interval_s: float = 60.0, **kw: Any) -> WorkerHeartbeat:
    """A heartbeat row as read back (not stored)."""
    kw.setdefault("release", SHIPPED)
    kw.setdefault("settings", {})
    kw.setdefault("started_at", T0 - timedelta(hours=1))
    return WorkerHeartbeat(
        node=node,
        host="h",
        pid=1,
        seen_at=T0 - timedelta(seconds=seen_ago_s),
        interval_s=interval_s,
        **kw,
    )


# ------------------------------------------------------------------------------- the worker's row


def test_a_worker_has_one_row_that_each_beat_refreshes(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a broker password must not reach the table (nor must the database URL)
    _settings_env(monkeypatch, broker_url="redis://user:s3cret@broker.example:6379/0", max_attempts="7")
    beat = _heartbeat()
    assert beat.beat(first=True, now=T0)
    assert beat.beat(first=True, now=T0)  # idempotent: still one row
    assert beat.report_runtime("openvino", {"m-a@1.0.0": "bf16", "m-b@1.0.0": "f32"}, now=T0)
    assert beat.beat(now=T0 + timedelta(seconds=60))
    [row] = _rows(url)
    assert row["node"] == "celery@a" and row["pid"] == os.getpid() and row["concurrency"] == 2
    assert row["release"] == SHIPPED and row["interval_s"] == 60.0
    assert row["seen_at"].replace(tzinfo=UTC) == T0 + timedelta(seconds=60)
    # a beat leaves the runtime a pool child reported
    assert row["runtime"] == "openvino" and row["precisions"] == {"m-a@1.0.0": "bf16", "m-b@1.0.0": "f32"}
    assert row["settings"]["visit_window_hours"] == 24.0 and row["settings"]["max_attempts"] == 7
    assert row["settings"]["store_dir"] == str(get_settings().store_path)
    assert "s3cret" not in json.dumps(row, default=str) and get_settings().database_url not in json.dumps(
        row, default=str
    )

    # the same node name started again: its first beat clears the old run's runtime and stop
    beat.stopped(now=T0 + timedelta(seconds=90))
    assert _rows(url)[0]["stopped_at"] is not None
    again = _heartbeat(started_at=T0 + timedelta(minutes=5), concurrency=1)
    assert again.beat(first=True, now=T0 + timedelta(minutes=5))
    [row] = _rows(url)
    assert row["runtime"] is None and row["precisions"] is None and row["stopped_at"] is None
    assert row["concurrency"] == 1 and row["started_at"].replace(tzinfo=UTC) == T0 + timedelta(minutes=5)


def test_a_worker_start_forgets_workers_unseen_for_a_month(url: str) -> None:
    """One row per node name: with generated host names (containers) a new one per start, so the
    table grew for ever. A start deletes the rows not seen for FORGOTTEN_AFTER, and only those."""
    old = _heartbeat("celery@gone")
    assert old.beat(first=True, now=T0 - hb.FORGOTTEN_AFTER - timedelta(minutes=1))
    recent = _heartbeat("celery@recent")
    assert recent.beat(first=True, now=T0 - hb.FORGOTTEN_AFTER + timedelta(minutes=1))
    assert recent.stopped(now=T0 - hb.FORGOTTEN_AFTER + timedelta(minutes=2))  # stopped, still listed
    assert {r["node"] for r in _rows(url)} == {"celery@gone", "celery@recent"}
    assert _heartbeat().beat(now=T0)  # a beat that is not a start forgets nothing
    assert {r["node"] for r in _rows(url)} == {"celery@gone", "celery@recent", "celery@a"}

    assert _heartbeat("celery@new").beat(first=True, now=T0)
    assert {r["node"] for r in _rows(url)} == {"celery@recent", "celery@a", "celery@new"}


def test_a_heartbeat_never_raises_when_the_database_is_away(
    isolated_settings: Path, caplog: pytest.LogCaptureFixture
) -> None:
    away = _heartbeat(db_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    no_table = _heartbeat(db_url=get_settings().database_url)  # not migrated
    with caplog.at_level(logging.WARNING, logger="workers.heartbeat"):
        for beat in (away, no_table):
            assert beat.beat(first=True) is False
            assert beat.report_runtime("onnx", None) is False
            assert beat.stopped() is False
    messages = [r.getMessage() for r in caplog.records]
    assert any("heartbeat of celery@a not written (start)" in m for m in messages), messages
    assert all("\n" not in m for m in messages)  # one line each, no traceback


def test_the_timer_keeps_beating_until_stopped(url: str) -> None:
    beat = _heartbeat(interval_s=0.05)
    assert beat.beat(first=True, now=T0)
    beat.start()
    try:
        deadline = time.monotonic() + 60  # a deadline, not a measurement
        while _rows(url)[0]["seen_at"].replace(tzinfo=UTC) == T0:
            assert time.monotonic() < deadline, "the timer never beat"
            time.sleep(0.05)
    finally:
        beat.stop()
    assert beat._thread is not None and not beat._thread.is_alive()


def test_the_worker_signals_write_the_row_the_child_reports_and_shutdown_marks_it(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers/app.py's receivers, sent as Celery sends them (no worker_ready: it starts timers)."""
    from celery.signals import celeryd_init, worker_shutdown

    import workers.app as worker_app

    for name in ("_concurrency", "_started_at", "_timer"):
        monkeypatch.setattr(worker_app, name, getattr(worker_app, name))
    monkeypatch.setattr(worker_hb, "_current", None)
    celeryd_init.send(sender="celery@sig", instance=None, conf=None, options={"concurrency": 3})
    [row] = _rows(url)
    assert row["node"] == "celery@sig" and row["concurrency"] == 3 and row["runtime"] is None
    worker_hb.report_loaded(SimpleNamespace(ref=SHIPPED, served_runtime="onnx", precisions=None))
    assert _rows(url)[0]["runtime"] == "onnx"
    worker_shutdown.send(sender=None)
    assert _rows(url)[0]["stopped_at"] is not None


# --------------------------------------------------------------------------- reading them back


def test_staleness_is_judged_by_each_workers_own_interval() -> None:
    assert hb.state(_row("a", seen_ago_s=179, interval_s=60), T0) == "live"
    assert hb.state(_row("b", seen_ago_s=181, interval_s=60), T0) == "stale"
    assert hb.state(_row("c", seen_ago_s=4, interval_s=1), T0) == "stale"
    assert hb.state(_row("d", seen_ago_s=0, stopped_at=T0), T0) == "stopped"
    rows = [_row("a", 179), _row("b", 181), _row("d", 0, stopped_at=T0)]
    assert [r.node for r in hb.live_workers(rows, T0)] == ["a"]


def test_settings_that_differ_are_named_with_who_has_which_value(isolated_settings: Path) -> None:
    own = hb.shared_settings(get_settings())
    alike = own | {"max_attempts": 5}
    workers = [
        _row("celery@a", 0, settings=alike),
        _row("celery@b", 0, settings=alike | {"visit_window_hours": 0.0, "max_attempts": 3}),
        _row("celery@old", 0, settings={"visit_window_hours": 24.0}),  # older code: fewer settings
    ]
    found = {m.setting: m for m in hb.settings_mismatches(workers, own)}
    assert set(found) == {"visit_window_hours", "max_attempts"}
    window = found["visit_window_hours"].describe()
    assert (
        window
        == "DRSCREEN_VISIT_WINDOW_HOURS differs: this process, celery@a, celery@old: 24.0; celery@b: 0.0"
    )
    # worker-only settings are compared between workers (the API's machine need not set them)
    assert "this process" not in found["max_attempts"].describe()

    # a worker with another store folder (session 18: it failed every photograph) or import roots
    other = own | {"store_dir": "/elsewhere/store", "import_roots": ["/srv/b", "/srv/a"]}
    found = {m.setting: m for m in hb.settings_mismatches([_row("celery@c", 0, settings=other)], own)}
    assert set(found) == {"store_dir", "import_roots"}
    assert "celery@c: /srv/b:/srv/a" in found["import_roots"].describe()
    assert hb.settings_mismatches([_row("celery@a", 0, settings=alike)], own) == []
    assert hb.fingerprint(own) == hb.fingerprint(dict(reversed(own.items())))


def test_a_stale_worker_is_not_compared_and_no_live_worker_is_a_warning(isolated_settings: Path) -> None:
    own = hb.shared_settings(get_settings())
    gone = _row("celery@gone", 3600, settings=own | {"max_image_pixels": 1}, release="x@0.1.0")
    assert hb.warnings([gone], own, SHIPPED, T0) == [
        "no worker is live (none sent a heartbeat within 3 of its intervals): nothing is being graded"
    ]
    assert hb.warnings([gone, _row("celery@a", 0, settings=own, runtime="onnx")], own, SHIPPED, T0) == []


def test_a_live_worker_that_never_loaded_its_model_is_a_warning(isolated_settings: Path) -> None:
    """The release review (session 29): a worker whose pool could not load the release stayed
    "live, loading" in status, exit 0, while every photograph waited."""
    own = hb.shared_settings(get_settings())
    stuck = _row("celery@stuck", 0, settings=own)  # started an hour ago, no runtime reported
    fresh = _row("celery@fresh", 0, settings=own, started_at=T0 - timedelta(minutes=2))
    assert hb.warnings([stuck, fresh], own, SHIPPED, T0) == [
        "worker celery@stuck has not loaded its model 60 min after starting: its pool cannot load "
        "the release (see its log); photographs wait"
    ]
    assert hb.warnings([_row("celery@ok", 0, settings=own, runtime="onnx"), fresh], own, SHIPPED, T0) == []


def test_release_warnings_with_and_without_an_activation() -> None:
    a, b = _row("celery@a", 0), _row("celery@b", 0, release="drscreen-ensemble@1.5.0")
    [other] = hb.release_warnings([a, b], SHIPPED)
    assert other.startswith("celery@b serves drscreen-ensemble@1.5.0, not the active release " + SHIPPED)
    assert f"DRSCREEN_MODEL={SHIPPED}" in other
    [mixed] = hb.release_warnings([a, b], None)
    assert "serve 2 releases" in mixed and "none is activated" in mixed
    assert hb.release_warnings([a], None) == [] and hb.release_warnings([a], SHIPPED) == []


# ---------------------------------------------------------------------------------- drscreen status


def _activate(url: str, ref: str = SHIPPED) -> None:
    with session_scope(url) as s:
        repo.activate_release(s, ref)


def test_status_is_quiet_when_every_worker_is_alike(url: str) -> None:
    _activate(url)
    assert _heartbeat().beat(first=True)
    assert _heartbeat().report_runtime("openvino", {"m@1": "bf16", "n@1": "f32"})
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert f"active release: {SHIPPED}" in result.output
    assert "photographs: 0 queued, 0 running, 0 failed in the last 24 h; open folder jobs: 0" in result.output
    [line] = [x for x in result.output.splitlines() if "celery@a" in x]
    assert SHIPPED in line and "openvino bf16,f32" in line and "live" in line
    assert "WARNING" not in result.output

    as_json = CliRunner().invoke(cli, ["status", "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["active_release"] == SHIPPED and report["warnings"] == []
    [worker] = report["workers"]
    assert (worker["node"], worker["state"], worker["release"], worker["runtime"]) == (
        "celery@a",
        "live",
        SHIPPED,
        "openvino",
    )
    assert worker["settings"] == report["settings"] | worker_hb.worker_settings(get_worker_settings())
    assert report["queue"]["broker"] == {"scoring": 0, "explain": 0, "uploads": 0}


def test_status_warns_about_another_release_and_a_setting_that_differs(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _activate(url)
    older = _heartbeat("celery@old")
    older.static["release"] = "drscreen-ensemble@1.5.0"  # as a worker with DRSCREEN_MODEL=...1.5.0
    assert older.beat(first=True)
    _settings_env(monkeypatch, visit_window_hours="0")
    assert _heartbeat("celery@zero").beat(first=True)
    monkeypatch.delenv("DRSCREEN_VISIT_WINDOW_HOURS")
    get_settings.cache_clear()

    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output
    warning = result.output.split("WARNING:\n", 1)[1]
    assert "celery@old serves drscreen-ensemble@1.5.0, not the active release" in warning
    assert "DRSCREEN_VISIT_WINDOW_HOURS differs: this process, celery@old: 24.0; celery@zero: 0.0" in warning
    report = json.loads(CliRunner().invoke(cli, ["status", "--json"]).stdout)
    assert len(report["warnings"]) == 2
    assert {w["node"]: w["settings"]["visit_window_hours"] for w in report["workers"]} == {
        "celery@old": 24.0,
        "celery@zero": 0.0,
    }


def test_status_warns_when_the_broker_cannot_be_reached(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator walkthrough: with the broker down, `drscreen status` printed "unavailable" and
    exited 0, so a health script reading its exit code saw nothing."""
    _activate(url)
    assert _heartbeat().beat(first=True)
    _settings_env(monkeypatch, broker_url="redis://127.0.0.1:9/0")  # nothing listens on port 9
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output
    assert "the broker cannot be reached" in result.output.split("WARNING:\n", 1)[1]


def test_status_warns_when_clinics_share_every_import_root(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: with DRSCREEN_IMPORT_PER_CLINIC false (the default) every clinic's
    folder jobs read every import root, other clinics' exports included, and nothing said so."""
    _activate(url)
    _settings_env(monkeypatch, import_roots=str(tmp_path))
    assert _heartbeat().beat(first=True)
    make_key(url, "North")
    quiet = CliRunner().invoke(cli, ["status"])
    assert quiet.exit_code == 0, quiet.output  # one clinic: nothing to share
    make_key(url, "South")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output  # a note: it may be meant, health scripts stay green
    assert (
        "2 clinics hold API keys and DRSCREEN_IMPORT_PER_CLINIC is false" in result.output.split("NOTE:\n")[1]
    )
    report = json.loads(CliRunner().invoke(cli, ["status", "--json"]).stdout)
    assert report["warnings"] == [] and len(report["notes"]) == 1
    _settings_env(monkeypatch, import_per_clinic="true")
    assert _heartbeat().beat()
    per_clinic = CliRunner().invoke(cli, ["status"])
    assert "DRSCREEN_IMPORT_PER_CLINIC is false" not in per_clinic.output, per_clinic.output


def test_status_with_only_a_stale_worker_says_nothing_is_graded(url: str) -> None:
    assert _heartbeat(interval_s=60).beat(first=True, now=utcnow() - timedelta(minutes=10))
    assert _heartbeat("celery@gone").beat(first=True, now=utcnow() - timedelta(days=3))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output
    [line] = [x for x in result.output.splitlines() if "celery@a" in x]
    assert "stale" in line and "10 min ago" in line
    assert "celery@gone" not in result.output and "1 not seen for more than 24 h" in result.output
    assert "no worker is live" in result.output


def test_status_on_a_database_problem_is_one_line_and_exit_2(
    isolated_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(cli, ["status"])  # not migrated
    assert result.exit_code == 2
    assert (
        result.output.strip() == "drscreen status: the database has no schema yet: run `drscreen db upgrade`"
    )
    _settings_env(monkeypatch, database_url="postgresql+psycopg://nobody:pw@127.0.0.1:1/none")
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drscreen: cannot use the database at "), lines
    assert "nobody:pw@" not in lines[0] and "nobody:***@" in lines[0]  # the password is hidden


# ----------------------------------------------------------------------------------------- /metrics


def _gauge(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def test_metrics_count_the_live_workers_and_say_when_settings_differ(
    client: TestClient, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = client.get("/metrics").text
    assert (
        _gauge(text, "drscreen_workers_live") == 0 and _gauge(text, "drscreen_worker_settings_mismatch") == 0
    )
    assert _heartbeat().beat(first=True)
    assert _heartbeat("celery@gone").beat(first=True, now=utcnow() - timedelta(hours=1))
    text = client.get("/metrics").text
    assert (
        _gauge(text, "drscreen_workers_live") == 1 and _gauge(text, "drscreen_worker_settings_mismatch") == 0
    )
    _settings_env(monkeypatch, max_image_pixels="1000")
    assert _heartbeat("celery@small").beat(first=True)
    text = client.get("/metrics").text
    assert (
        _gauge(text, "drscreen_workers_live") == 2 and _gauge(text, "drscreen_worker_settings_mismatch") == 1
    )
    assert _gauge(text, "drscreen_workers_live_on_active_release") == 2  # none activated: every live one
    # the operator walkthrough: a release activated that no live worker serves looked healthy
    _activate(url, "drscreen-ensemble@1.5.0")
    assert _gauge(client.get("/metrics").text, "drscreen_workers_live_on_active_release") == 0
    _activate(url)
    assert _gauge(client.get("/metrics").text, "drscreen_workers_live_on_active_release") == 2


def test_status_warns_when_the_active_release_was_changed_after_its_export(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second review (session 29): status named an edited release as active, with no warning,
    while every worker refused it."""
    import shutil

    name, version = SHIPPED.split("@")
    folder = tmp_path / "models" / "ensembles" / name / version
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "ensembles" / name / version, folder)
    monkeypatch.setenv("DRSCREEN_MODELS_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    _activate(url)
    assert _heartbeat().beat(first=True) and _heartbeat().report_runtime("onnx", None)
    quiet = CliRunner().invoke(cli, ["status"])
    assert quiet.exit_code == 0, quiet.output
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["combination"]["thresholds"] = [0.1, 0.2, 0.3, 0.4]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    warned = CliRunner().invoke(cli, ["status"])
    assert warned.exit_code == 1 and f"the active release {SHIPPED} is not usable" in warned.output


def test_status_warns_about_a_worker_whose_clock_is_ahead(url: str) -> None:
    """The time review (session 32): a worker host ten minutes ahead showed "0 s ago, live" (its
    heartbeat dated in the future), and nothing told the operator that the machines' clocks differ,
    which moves the sweep's staleness limits and keeps a dead worker "live" ten minutes longer."""
    _activate(url)
    ahead, its_clock = _heartbeat("celery@ahead"), utcnow() + timedelta(minutes=10)
    assert ahead.beat(first=True, now=its_clock)
    assert ahead.report_runtime("onnx", {}, now=its_clock)
    assert _heartbeat().beat(first=True)
    assert _heartbeat().report_runtime("onnx", {})
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1, result.output
    [warning] = result.output.split("WARNING:\n", 1)[1].splitlines()
    assert warning.startswith(
        "  - the clock of worker celery@ahead is at least 10 min ahead of this machine's"
    )
    [line] = [x for x in result.output.splitlines() if x.startswith("  celery@ahead ")]
    assert "min ahead" in line and "ago" not in line  # it read "0 s ago"
    # a heartbeat a moment ahead (clocks a second apart, a beat written as status reads) is no finding
    assert hb.clock_warnings([_row("celery@near", -5, runtime="onnx")], T0) == []
