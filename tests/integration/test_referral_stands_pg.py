"""A referred patient stays on the referral surfaces while a real worker grades a photograph of
theirs again and fails (session 32), on real PostgreSQL, Redis and ``drscreen worker``.

The earlier release (a stub, through the worker's own scoring code) referred P1: 16_left graded 4,
19_left and 19_right 0. ``drscreen-dev@0.1.0`` is activated and a real worker serving it grades a
new photograph of the right eye, which queues the three again; 16_left's stored file is gone (a
file-store fault), so its re-grade waits, then fails after ``DRSCREEN_MAX_ATTEMPTS``. Before the
fix the stored result said "no referral" as soon as 19_left was graded again (its eye graded from
it alone), the home page lost P1, and after the failure the API and the web page said
"No referral" too."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image
from tests.api_support import make_key, sample_bytes
from tests.conftest import WorkerProcess, _clear_cached_settings
from tests.unit.test_referral_stands import OLD, current, grade, surfaces

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RELEASE = "drscreen-dev@0.1.0"


@pytest.fixture
def url(own_pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DRSCREEN_BROKER_URL", redis_url)
    _clear_cached_settings()
    return own_pg_url


def _wait(condition: Callable[[], bool], what: str, worker: WorkerProcess, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen in {timeout}s; worker log:\n{worker.output()[-4000:]}")
        time.sleep(0.5)


def _status(url: str, image_id: str) -> str:
    with session_scope(url) as s:
        row = s.get(Image, image_id)
        assert row is not None
        return row.status


def test_a_referral_stands_while_a_real_worker_grades_its_photograph_again_and_fails(
    url: str, redis_url: str, client: TestClient, start_worker: Callable[..., WorkerProcess]
) -> None:
    store = FileStore(get_settings().store_path)
    key_headers = make_key(url, "North").headers
    files = {
        name: (f"{name}.jpg", sample_bytes(*name.split("_")), "image/jpeg")
        for name in ("16_left", "19_left", "19_right")
    }
    answer = client.post(
        "/v1/bundles",
        data={"patient_id": "P1"},
        files={"left_1": files["16_left"], "left_2": files["19_left"], "right_1": files["19_right"]},
        headers=key_headers,
    )
    assert answer.status_code == 202, answer.text
    with session_scope(url) as s:
        ids = {str(im.filename).removesuffix(".jpg"): im.id for im in s.query(Image)}
        lost = store.root / s.get(Image, ids["16_left"]).stored_path  # type: ignore[union-attr]
    grade([ids["16_left"]], OLD, 4, store, url)
    grade([ids["19_left"], ids["19_right"]], OLD, 0, store, url)
    assert current(url) == (True, OLD)
    with session_scope(url) as s:
        repo.activate_release(s, RELEASE)
    lost.unlink()

    worker = start_worker(
        env={
            "DRSCREEN_DATABASE_URL": url,
            "DRSCREEN_BROKER_URL": redis_url,
            "DRSCREEN_STORE_DIR": str(store.root),
            "DRSCREEN_MODEL": RELEASE,
            "DRSCREEN_EXPLAIN": "false",
            "DRSCREEN_MAX_ATTEMPTS": "3",
            "DRSCREEN_SWEEP_INTERVAL_S": "5",
            "DRSCREEN_STALE_QUEUED_MINUTES": "0.1",
            "DRSCREEN_STALE_RUNNING_MINUTES": "0.1",
            "DRSCREEN_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        },
        ready_timeout=240,
    )
    new = client.post(
        "/v1/images",
        data={"patient_id": "P1", "eye": "right"},
        files={"file": ("229_right.jpg", sample_bytes("229", "right"), "image/jpeg")},
        headers=key_headers,
    )
    assert new.status_code == 202, new.text

    def regraded_but_16_left() -> bool:
        with session_scope(url) as s:
            version = repo.get_model_version_by_ref(s, RELEASE)
            if version is None:
                return False
            done = repo.predictions_for_images(s, [ids["19_left"], ids["19_right"]], version.id)
        return len(done) == 2 and _status(url, ids["16_left"]) in ("queued", "running")

    _wait(regraded_but_16_left, "19_left and 19_right graded again while 16_left waits", worker)
    during = surfaces(client, url)
    # before the fix: stored (False, drscreen-dev@0.1.0), the home page without P1, the web page "Scoring…"
    assert during["home_lists"], (during["stored"], during["reasons"])
    assert during["referable"] and during["web"] == "REFER"
    assert during["rechecking"] and during["home_rechecking"] and during["stored"] == (True, OLD)

    _wait(lambda: _status(url, ids["16_left"]) == "failed", "16_left's re-grade failed", worker)
    failed = surfaces(client, url)
    # before the fix: "No referral" on every surface, for good
    assert failed["home_lists"] and failed["referable"] and failed["web"] == "REFER", failed["stored"]
    assert failed["rechecking"] and failed["stored"] == (True, OLD)
