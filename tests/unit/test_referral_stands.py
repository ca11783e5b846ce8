"""A patient to refer never drops off the referral surfaces while a photograph is graded again
(session 32). The photograph being graded again counts as ungradable in a new result, and its eye
was then graded from its other photograph alone: the stored result said "no referral", so the home
page's "Patients to refer" lost the patient (for good when the re-grade failed), the API said
"pending" and the web page "Scoring…". The referral now stands, marked as being re-checked, until
a complete decision replaces it (``repository.held_referral``). On SQLite, through the worker's
own scoring path with stub releases; tests/integration/test_referral_stands_pg.py runs it with a
real worker on PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import select

from cli.recheck import recheck_patients
from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import Image, ModelVersion, Patient
from services.views import patient_summaries
from tests.api_support import make_key, web_cookie
from tests.unit.test_workers_scoring import Sent, StubEnsemble, StubPrediction, add_images, photo
from workers import scoring

OLD, NEW = "stub-ensemble@1.0.0", "stub-ensemble@2.0.0"
REFERABLE = [0.0, 0.05, 0.05, 0.2, 0.7]  # grade 4
CLEAN = [0.8, 0.15, 0.05, 0.0, 0.0]  # grade 0


@dataclass
class Fixed(StubEnsemble):
    """A release that grades every photograph it is given ``grade`` (4 or 0)."""

    grade: int = 0

    def predict(
        self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None
    ) -> list[StubPrediction]:
        probs = REFERABLE if self.grade == 4 else CLEAN
        return [StubPrediction(list(probs), self.grade, {"m@1": list(probs)}) for _ in images]

    def grade_eye(self, probabilities: Sequence[float], members: Mapping[str, Sequence[float]] | None) -> int:
        return self.grade_from_probabilities(probabilities)


def grade(ids: list[str], ref: str, value: int, store: FileStore, url: str) -> scoring.ScoreSummary:
    return scoring.score_images(
        ids, ensemble=Fixed(ref=ref, grade=value), store=store, db_url=url, enqueue=Sent(), explain=False
    )


def referred_patient(url: str, store: FileStore) -> dict[str, str]:
    """P1 graded by the earlier release: left 16 (grade 4) and 17 (grade 0), right 16 (grade 0):
    referred (one left photograph is referable on its own). Returns the ids by file name."""
    files = [photo("16_left.jpg"), photo("17_left.jpg"), photo("16_right.jpg")]
    ids = dict(zip([f[0] for f in files], add_images(url, store, "P1", files), strict=True))
    grade([ids["16_left.jpg"]], OLD, 4, store, url)
    grade([ids["17_left.jpg"], ids["16_right.jpg"]], OLD, 0, store, url)
    return ids


def current(url: str) -> tuple[bool, str]:
    with session_scope(url) as s:
        patient_id = s.scalar(select(Image.patient_id).limit(1))
        assert patient_id is not None
        result = repo.get_current_patient_result(s, patient_id)
        assert result is not None
        return result.referable, s.get(ModelVersion, result.model_version_id).ref  # type: ignore[union-attr]


def surfaces(client: TestClient, url: str) -> dict[str, Any]:
    """What a clinic sees of P1: the API's answer, the home page's list, the web patient page."""
    key = make_key(url, "North")
    api = client.get("/v1/patients/P1", headers=key.headers).json()
    cookie = web_cookie(client, key)
    home = client.get("/", headers=cookie).text
    listed = home.split('data-testid="to-refer"', 1)
    rows = listed[1].split("</table>", 1)[0] if len(listed) > 1 else ""
    page = client.post("/patients", data={"patient_id": "P1"}, headers=cookie).text
    headline = page.split('data-testid="verdict-headline">', 1)[1].split("</div>", 1)[0].strip()
    return {
        "referable": api["referable"],
        "rechecking": api.get("rechecking"),
        "reasons": api["referral_reasons"],
        "model_version": api["model_version"],
        "home_lists": ">P1<" in rows,
        "home_rechecking": 'data-testid="rechecking"' in rows,
        "web": headline,
        "web_detail": page,
        "stored": current(url),
    }


def test_a_referral_stands_while_its_photograph_is_graded_again(url: str, client: TestClient) -> None:
    store = FileStore(get_settings().store_path)
    ids = referred_patient(url, store)
    before = surfaces(client, url)
    assert before["referable"] and before["home_lists"] and not before["rechecking"]
    with session_scope(url) as s:
        repo.activate_release(s, NEW)
    # a new photograph of the right eye: the new release grades it and queues the others again
    summary = grade(add_images(url, store, "P1", [photo("17_right.jpg")]), NEW, 0, store, url)
    assert sorted(summary.rescore) == sorted(ids.values())
    assert current(url)[0]
    # it grades two of them first (a worker killed after its claim takes them one at a time)
    grade([ids["17_left.jpg"], ids["16_right.jpg"]], NEW, 0, store, url)

    # before the fix: stored "not referable" (grade 0 from 17_left alone), the home page lost P1,
    # the API said referable only as "left_eye_pending" and the web page "Scoring…"
    during = surfaces(client, url)
    assert during["home_lists"], (during["stored"], during["reasons"])
    assert during["web"] == "REFER", during["web"]
    assert current(url) == (True, OLD)  # the last complete decision, not a partial one
    assert during["referable"] and during["rechecking"] and during["model_version"] == OLD
    assert during["reasons"] == ["left_eye_photograph_referable"]
    assert during["home_rechecking"] and "Being re-checked" in during["web_detail"]

    # the new release's complete decision withdraws the referral: it is a decision, not a gap
    grade([ids["16_left.jpg"]], NEW, 0, store, url)
    assert current(url) == (False, NEW)
    after = surfaces(client, url)
    assert not after["referable"] and not after["rechecking"] and not after["home_lists"]
    assert after["web"] == "No referral"


def test_a_failed_regrade_never_withdraws_a_referral(url: str, client: TestClient) -> None:
    """The re-grade of the referable photograph fails (its stored file went missing): before the fix
    the recompute of the failure recorded "no referral" for good."""
    store = FileStore(get_settings().store_path)
    ids = referred_patient(url, store)
    with session_scope(url) as s:
        repo.activate_release(s, NEW)
        lost = store.root / s.get(Image, ids["16_left.jpg"]).stored_path  # type: ignore[union-attr]
    lost.unlink()
    grade(add_images(url, store, "P1", [photo("17_right.jpg")]), NEW, 0, store, url)
    grade([ids["17_left.jpg"], ids["16_right.jpg"]], NEW, 0, store, url)
    for _ in range(10):  # the worker's attempts at the missing file, then failed
        grade([ids["16_left.jpg"]], NEW, 0, store, url)
        with session_scope(url) as s:
            if s.get(Image, ids["16_left.jpg"]).status == "failed":  # type: ignore[union-attr]
                break
    with session_scope(url) as s:
        assert s.get(Image, ids["16_left.jpg"]).status == "failed"  # type: ignore[union-attr]
    failed = surfaces(client, url)
    assert failed["home_lists"] and failed["referable"] and failed["web"] == "REFER", failed["stored"]
    assert failed["rechecking"] and current(url) == (True, OLD)
    with session_scope(url) as s:  # a folder job's list of patients to refer (and its CSV) reads these
        patient = s.scalars(select(Patient)).one()
        listed = patient_summaries(s, [patient])[patient.id]
        assert listed.referable and listed.rechecking and listed.model_version == OLD

    # the clinic sends the same photograph again: graded, the decision is complete again
    again = add_images(url, store, "P1", [photo("16_left.jpg")])
    grade(again, NEW, 4, store, url)
    assert current(url) == (True, NEW)
    assert not surfaces(client, url)["rechecking"]


def test_a_decision_that_refers_replaces_a_no_referral_at_once(url: str) -> None:
    """What stays as it was: with no referral standing, a photograph graded again counts as
    ungradable (so referable) in a result recorded at once (the earlier release's "not referable"
    must not stand while it waits); and a first decision is recorded at once."""
    store = FileStore(get_settings().store_path)
    files = [photo("16_left.jpg"), photo("16_right.jpg")]
    left, right = add_images(url, store, "P2", files)
    grade([left], OLD, 0, store, url)
    assert current(url) == (True, OLD)  # first decision, the right eye not in yet: referable
    grade([right], OLD, 0, store, url)
    assert current(url) == (False, OLD)
    with session_scope(url) as s:
        repo.activate_release(s, NEW)
    extra = add_images(url, store, "P2", [photo("17_right.jpg")])
    grade(extra, NEW, 0, store, url)
    assert current(url) == (True, NEW)  # 16_left queued again: its eye ungradable for now


def test_recheck_keeps_a_referral_while_its_photograph_is_graded_again(url: str) -> None:
    """``drscreen db recheck-patients`` recomputes from the stored grades: with the referable
    photograph queued again it read it as ungradable and recorded "no referral"."""
    store = FileStore(get_settings().store_path)
    release = "drscreen-dev@0.1.0"  # the recheck reads the release's own combination rule
    files = [photo("16_left.jpg"), photo("17_left.jpg"), photo("16_right.jpg")]
    l1, l2, r1 = add_images(url, store, "P1", files)
    grade([l1], release, 4, store, url)
    grade([l2, r1], release, 0, store, url)
    assert current(url) == (True, release)
    with session_scope(url) as s:
        repo.requeue_image(s, s.get(Image, l1))  # type: ignore[arg-type]
    summary = recheck_patients(database_url=url)
    assert summary.changed == [] and summary.held == 1
    assert current(url) == (True, release)


def test_the_home_page_marks_a_referral_re_checked_only_when_its_decision_is(
    url: str, client: TestClient
) -> None:
    """The final review of session 32: the home page's "being re-checked" was any photograph of
    the patient, of any visit, graded before and now queued, running or failed, while the patient
    page and the API mark only the decision's own photographs. An earlier visit's photograph whose
    re-grade failed marked today's referral "being re-checked" on the worklist for good, while the
    patient's page (and ``rechecking`` in the API) said it was not."""
    store = FileStore(get_settings().store_path)
    earlier = add_images(url, store, "P1", [photo("17_left.jpg"), photo("16_right.jpg")])
    grade(earlier, OLD, 0, store, url)
    with session_scope(url) as s:
        old = s.get(Image, earlier[0])
        assert old is not None
        old.status = "failed"  # graded, then its re-grade failed: the earlier visit's, not today's
        for image_id in earlier:  # a month ago: an earlier visit
            im = s.get(Image, image_id)
            assert im is not None
            im.created_at = im.created_at - timedelta(days=30)
    today = add_images(url, store, "P1", [photo("16_left.jpg"), photo("17_right.jpg")])
    grade(today, OLD, 4, store, url)
    assert current(url) == (True, OLD)
    seen = surfaces(client, url)
    assert seen["referable"] and seen["home_lists"] and seen["rechecking"] is False
    assert "Being re-checked" not in seen["web_detail"]
    assert not seen["home_rechecking"]  # before the fix: "being re-checked", the page said not
