"""``drscreen demo`` as a user runs it: a subprocess on the embedded defaults (SQLite file,
filesystem broker, a real worker it starts itself), in a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from services.demo import process_group_alive
from tests.api_support import REPO_ROOT, model_env, wait_for
from tests.conftest import DRSCREEN_BIN

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SAMPLE_PATIENTS = ("16", "19", "178", "229")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRSCREEN_")}
    var = tmp_path / "var"
    env.update(
        {
            "DRSCREEN_VAR_DIR": str(var),
            **model_env(),  # the small test ensemble keeps this quick on 2 cores
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    proc = subprocess.run(
        [str(DRSCREEN_BIN), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    worker_log = var / "demo" / "worker.log"
    context = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    if worker_log.exists():
        context += f"\nworker log:\n{worker_log.read_text(errors='replace')[-4000:]}"
    assert proc.returncode == 0, context
    for patient in SAMPLE_PATIENTS:
        assert re.search(rf"\b{patient}\b", proc.stdout), context
    assert "bundle" in proc.stdout and "job" in proc.stdout
    # every photograph's EyePACS grade recorded as its grader's grade, and the agreement printed
    assert ": 8 photograph(s) graded by both" in proc.stdout, context
    assert re.search(r"grader \\ model +0 +1 +2 +3 +4", proc.stdout), context
    heatmaps = sorted((var / "demo" / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 8, context
    for path in heatmaps:
        assert str(path) in proc.stdout, context
    # Nothing left running: the worker's whole process group is gone.
    pid = int((var / "demo" / "worker.pid").read_text())
    assert wait_for(lambda: not process_group_alive(pid), bool, 10, "worker process group gone")
