"""A grader's "refer" reaches every referral surface (session 32), on real PostgreSQL, Redis and a
real ``drscreen worker`` serving ``drscreen-dev@0.1.0``.

The worker grades P1's visit (19_left and 19_right, EyePACS grade 0) not referable; a grader then
grades 19_left 3 through the API. Before the fix nothing changed: the API said ``referable: false``
with nothing else, the home page's "Patients to refer" did not list P1 and the patient and visit
pages said "No referral". The model's own fields stay as they are (the contract's rule); the
grader's referral is its own field and its own mark on each page, and a later grade that is not
referable withdraws it. The SQLite tests of tests/unit/test_grader_referral.py run here too."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.tables import Bundle, Image
from tests.api_support import make_key, sample_bytes
from tests.conftest import WorkerProcess, _clear_cached_settings
from tests.grader_referral_support import surfaces
from tests.unit.test_grader_referral import (  # noqa: F401  (collected here: the same tests on PostgreSQL)
    test_a_graders_refer_lists_the_patient_and_a_later_grade_withdraws_it,
    test_a_jobs_patient_rows_carry_the_graders_referral,
    test_a_patient_the_model_refers_too_is_listed_once_with_both,
    test_another_clinics_grader_referrals_are_not_listed,
    test_only_the_latest_visit_counts,
    test_the_home_page_reads_the_same_statements_for_three_grader_referrals_as_for_six,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RELEASE = "drscreen-dev@0.1.0"


@pytest.fixture
def url(own_pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DRSCREEN_BROKER_URL", redis_url)
    _clear_cached_settings()
    return own_pg_url


def _graded(url: str, bundle_id: str) -> bool:
    with session_scope(url) as s:
        bundle = s.get(Bundle, bundle_id)
        assert bundle is not None
        statuses = {im.status for im in s.query(Image).filter(Image.bundle_id == bundle_id)}
        return statuses == {"done"} and repo.get_current_patient_result(s, bundle.patient_id) is not None


def test_a_graders_refer_reaches_the_referral_surfaces_with_a_real_worker(
    url: str, redis_url: str, client: TestClient, start_worker: Callable[..., WorkerProcess]
) -> None:
    key = make_key(url, "North")
    with session_scope(url) as s:
        repo.activate_release(s, RELEASE)
    worker = start_worker(
        env={
            "DRSCREEN_DATABASE_URL": url,
            "DRSCREEN_BROKER_URL": redis_url,
            "DRSCREEN_STORE_DIR": str(get_settings().store_path),
            "DRSCREEN_MODEL": RELEASE,
            "DRSCREEN_EXPLAIN": "false",
            "DRSCREEN_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        },
        ready_timeout=240,
    )
    files = {
        slot: (f"19_{eye}.jpg", sample_bytes("19", eye), "image/jpeg")
        for slot, eye in (("left_1", "left"), ("right_1", "right"))
    }
    answer = client.post("/v1/bundles", data={"patient_id": "P1"}, files=files, headers=key.headers)
    assert answer.status_code == 202, answer.text
    bundle_id = answer.json()["id"]
    deadline = time.monotonic() + 300
    while not _graded(url, bundle_id):
        if time.monotonic() > deadline:
            pytest.fail(f"P1 not graded in 300 s; worker log:\n{worker.output()[-4000:]}")
        time.sleep(0.5)
    with session_scope(url) as s:
        ids = {im.eye: im.id for im in s.query(Image).filter(Image.bundle_id == bundle_id)}
    page = f"/bundles/{bundle_id}"

    model = surfaces(client, key, "P1", page)
    # the premise: the release does not refer P1 (19's photographs are EyePACS grade 0)
    assert model["referable"] is False and not model["home_lists"] and model["web"] == "No referral", model

    graded = client.put(
        f"/v1/images/{ids['left']}/grader-grade", json={"grade": 3, "grader": "Dr A"}, headers=key.headers
    )
    assert graded.status_code == 200, graded.text
    refer = surfaces(client, key, "P1", page)
    # before the fix: referable false and nothing else, P1 not on the home page, "No referral" on
    # the patient page and the visit's page
    seen = (refer["home_lists"], refer["web"], refer["page"], refer["grader_refers"])
    assert seen == (True, "REFER (grader)", "REFER (grader)", True), seen
    assert refer["home_grader"], refer
    banner = refer["web_banner"]
    assert "a grader (Dr A) graded the left eye&#39;s photograph 3" in banner, banner
    assert "not the model&#39;s" in refer["page_banner"], refer["page_banner"]
    # the model's own fields (the contract's rule) are the model's still
    assert (refer["referable"], refer["grade"]) == (model["referable"], model["grade"])
    assert [(r["image_id"], r["eye"], r["grade"], r["grader"]) for r in refer["grader_referrals"]] == [
        (ids["left"], "left", 3, "Dr A")
    ]
    # the agreement still measures the model against the grader: this is its miss
    agreement = client.get("/v1/agreement", headers=key.headers).json()
    assert agreement["missed_referable"] == [ids["left"]] and agreement["referable"]["false_negative"] == 1

    # the grader grades it again, 1: the grader's referral is withdrawn (the latest grade counts)
    regraded = client.put(
        f"/v1/images/{ids['left']}/grader-grade", json={"grade": 1, "grader": "Dr B"}, headers=key.headers
    )
    assert regraded.status_code == 200, regraded.text
    withdrawn = surfaces(client, key, "P1", page)
    assert withdrawn["grader_refers"] is False and withdrawn["grader_referrals"] == []
    assert not withdrawn["home_lists"]
    assert withdrawn["web"] == withdrawn["page"] == "No referral"
