"""A real `drscreen worker` (Redis, PostgreSQL, the dev ensemble) writes its heartbeat row, keeps
it fresh with the sweep off, reports the runtime its pool child loaded, and marks it stopped on a
warm shutdown; `drscreen status --json` lists it.

Waits are deadlines on polls (a busy CI box is slow), never measurements."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app as cli
from core import deployment_key
from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from tests.conftest import WorkerProcess

DEV_MODEL = "drscreen-dev@0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_READY_S = 180
WAIT_S = 120

pytestmark = pytest.mark.timeout(600)


def _row(url: str) -> dict[str, Any] | None:
    with session_scope(url) as s:
        rows = repo.worker_heartbeats(s)
        assert len(rows) <= 1, [r.node for r in rows]
        if not rows:
            return None
        return {
            "node": rows[0].node,
            "release": rows[0].release,
            "runtime": rows[0].runtime,
            "seen_at": rows[0].seen_at,
            "stopped_at": rows[0].stopped_at,
            "pid": rows[0].pid,
            "settings": rows[0].settings or {},
        }


def _wait(check: Callable[[], Any], worker: WorkerProcess, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{worker.output()[-6000:]}")


def _status() -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["status", "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def test_a_real_worker_beats_and_drscreen_status_lists_it(
    own_pg_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    models_dir = Path(os.environ.get("DRSCREEN_TEST_MODELS_DIR") or REPO_ROOT / "models")
    if not (models_dir / "ensembles" / "drscreen-dev" / "0.1.0" / "manifest.json").is_file():
        pytest.fail(f"{DEV_MODEL} is not released under {models_dir}", pytrace=False)
    env = {
        "DRSCREEN_DATABASE_URL": own_pg_url,
        "DRSCREEN_BROKER_URL": redis_url,
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
        "DRSCREEN_STORE_DIR": str(tmp_path / "store"),
        "DRSCREEN_MODEL": DEV_MODEL,
        "DRSCREEN_MODELS_DIR": str(models_dir),
        "DRSCREEN_TORCH_THREADS": "1",
        "DRSCREEN_SWEEP_INTERVAL_S": "0",  # the heartbeat must not depend on the sweep
        "DRSCREEN_HEARTBEAT_INTERVAL_S": "0.5",
        "OMP_NUM_THREADS": "1",
    }
    for key, value in env.items():  # this process is "the API's machine": the same settings
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    with session_scope(own_pg_url) as s:
        repo.activate_release(s, DEV_MODEL)

    worker = start_worker(env=env, ready_timeout=WORKER_READY_S)
    # the pool child reports the runtime once it has loaded the model
    first = _wait(lambda: (row := _row(own_pg_url)) and row["runtime"] and row, worker, "the runtime report")
    assert first["release"] == DEV_MODEL and first["node"].startswith("celery@")
    assert first["runtime"] in {"torch", "onnx", "openvino"} and first["stopped_at"] is None
    assert first["pid"] == worker.proc.pid  # the main process (`drscreen worker`), not the child
    # the worker made the store's deployment key at start: a process on another disk would differ
    assert first["settings"]["store_identity"] == deployment_key.fingerprint(tmp_path / "store") != "none"
    # later beats come from the main process's timer, with the sweep off
    _wait(lambda: (row := _row(own_pg_url)) and row["seen_at"] > first["seen_at"], worker, "a later beat")

    def listed_live() -> tuple[int, dict[str, Any]] | None:
        code, report = _status()
        live = [w for w in report["workers"] if w["state"] == "live"]
        return (code, report) if live else None

    code, report = _wait(listed_live, worker, "drscreen status to list the worker live")
    [listed] = report["workers"]
    assert (listed["node"], listed["release"], listed["runtime"]) == (
        first["node"],
        DEV_MODEL,
        first["runtime"],
    )
    assert report["active_release"] == DEV_MODEL
    assert report["warnings"] == [] and code == 0, report["warnings"]

    worker.stop()  # SIGTERM: Celery's warm shutdown
    assert worker.proc.returncode is not None
    stopped = _row(own_pg_url)
    assert stopped is not None and stopped["stopped_at"] is not None, worker.output()[-3000:]
    code, report = _status()
    assert code == 1 and report["workers"][0]["state"] == "stopped"
    assert any("no worker is live" in w for w in report["warnings"])
