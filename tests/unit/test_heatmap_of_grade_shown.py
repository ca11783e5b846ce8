"""A photograph's heatmap is the one of the grade shown: after a change of release, the page and
the API served any release's newest heatmap (the Grad-CAM review, session 30): a photograph the
new release found ungradable kept the old release's map, a re-graded one showed the old map beside
the new grade, and a worker of the old release could still draw one."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from tests.api_support import Key, make_key, sample_bytes, web_cookie
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images
from workers import explain as explain_mod
from workers import scoring


def _regraded(url: str, image_id: str, ref: str, gradable: bool) -> None:
    """``image_id`` graded again by release ``ref`` (as re-scoring records it)."""
    with session_scope(url) as s:
        mv = repo.get_or_create_model_version(s, ref)
        probs = [0.8, 0.05, 0.05, 0.05, 0.05]
        repo.upsert_prediction(
            s, image_id=image_id, model_version_id=mv.id, grade=0 if gradable else None,
            probabilities=probs, members=None, referable=not gradable, gradable=gradable,
        )  # fmt: skip
        image = repo.get_image(s, image_id)
        assert image is not None
        repo.mark_image_done(s, image, quality={"gradable": gradable}, gradable=gradable)


def _graded(
    url: str, patient: str, ens: StubEnsemble, photograph: str = "left"
) -> tuple[FileStore, Key, str]:
    """North's key and one photograph of ``patient`` as its left eye (sample 16's ``photograph``),
    graded by ``ens`` without a heatmap: the store, the key and the photograph's id."""
    store = FileStore(get_settings().store_path)
    key = make_key(url, "North")
    [image_id] = add_images(url, store, patient, [("l.jpg", sample_bytes("16", photograph), "left")])
    scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=Sent(), explain=False)
    return store, key, image_id


def test_the_heatmap_shown_is_the_one_of_the_grade_shown(url: str, client: TestClient) -> None:
    old = StubEnsemble()
    store, key, image_id = _graded(url, "P-17", old)
    assert explain_mod.explain_image(image_id, ensemble=old, store=store, db_url=url) is not None
    route = f"/v1/images/{image_id}/explanation"
    assert client.get(route, headers=key.headers).status_code == 200

    # the new release finds the photograph ungradable: no heatmap, on the API or the page
    _regraded(url, image_id, "stub-ensemble@0.0.2", gradable=False)
    with session_scope(url) as s:
        assert repo.current_explanation(s, image_id) is None
    refused = client.get(route, headers=key.headers)
    assert refused.status_code == 404 and "ungradable" in refused.text
    page = client.get(f"/images/{image_id}", headers=web_cookie(client, key))
    assert page.status_code == 200 and f"/images/{image_id}/heatmap" not in page.text

    # graded again, gradable: the old release's map is not shown beside the new grade, and a
    # worker of the old release does not draw one; the new release's worker does
    _regraded(url, image_id, "stub-ensemble@0.0.2", gradable=True)
    with session_scope(url) as s:
        assert repo.current_explanation(s, image_id) is None
    assert client.get(route, headers=key.headers).status_code == 409  # not ready: asked for
    assert explain_mod.explain_image(image_id, ensemble=old, store=store, db_url=url) is None
    new = replace(StubEnsemble(), ref="stub-ensemble@0.0.2")
    drawn = explain_mod.explain_image(image_id, ensemble=new, store=store, db_url=url)
    with session_scope(url) as s:
        shown = repo.current_explanation(s, image_id)
        assert shown is not None and shown.stored_path == drawn
    assert client.get(route, headers=key.headers).status_code == 200


def test_a_heatmap_drawn_before_the_one_scale_is_labelled_and_drawn_again(
    url: str, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviews of session 30: heatmaps stored before maps shared one scale (each stretched to
    its own peak: a grade-0 eye's red spot) were shown under the new caption, which says little
    colour means little evidence; hidden instead, the heatmap of a photograph whose release no
    worker serves any more was "retry shortly" for ever. It is served, captioned as what it is,
    and asked for again: a worker of its release draws it on the current scale."""
    from sqlalchemy import update

    from core.tables import HEATMAP_SCALE, Explanation

    ens = StubEnsemble()
    store, key, image_id = _graded(url, "P-18", ens, photograph="right")
    assert explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url) is not None
    page = client.get(f"/images/{image_id}", headers=web_cookie(client, key)).text
    assert "drawn before heatmaps shared one colour scale" not in page
    with session_scope(url) as s:  # as migration b2e5d8a1c3f7 leaves a heatmap drawn before it
        s.execute(update(Explanation).where(Explanation.image_id == image_id).values(scale=None))
    import services.routes.images as image_routes

    asked: list[str] = []

    def send(image: str, app: object = None) -> None:
        asked.append(image)

    monkeypatch.setattr(image_routes.tasks_out, "send_explain_image", send)
    served = client.get(f"/v1/images/{image_id}/explanation", headers=key.headers)
    assert served.status_code == 200 and asked == [image_id]  # served, and drawn again
    page = client.get(f"/images/{image_id}", headers=web_cookie(client, key)).text
    assert f"/images/{image_id}/heatmap" in page and "drawn before heatmaps shared one colour scale" in page
    # a worker of another release does not redraw it (it keeps being served as it is) ...
    other = replace(StubEnsemble(), ref="stub-ensemble@0.0.9")
    assert explain_mod.explain_image(image_id, ensemble=other, store=store, db_url=url) is None
    # ... a worker of its release does, on the current scale
    again = explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url)
    with session_scope(url) as s:
        shown = repo.current_explanation(s, image_id)
        assert shown is not None and shown.scale == HEATMAP_SCALE and shown.stored_path == again
    page = client.get(f"/images/{image_id}", headers=web_cookie(client, key)).text
    assert "drawn before heatmaps shared one colour scale" not in page


def test_after_a_rollback_the_activated_releases_grade_and_heatmap_are_shown(
    url: str, client: TestClient
) -> None:
    """The review of session 30: release A graded X and drew its heatmap, B (activated) graded X
    again, then the operator rolled back to A. A does not grade X again (its grade exists), yet the
    photograph showed B's grade and looked for B's heatmap, which A's workers do not draw: "not
    ready" for ever, beside a patient decision that was A's."""
    a = StubEnsemble()
    store, key, image_id = _graded(url, "P-19", a)
    drawn = explain_mod.explain_image(image_id, ensemble=a, store=store, db_url=url)
    with session_scope(url) as s:
        repo.activate_release(s, "stub-ensemble@0.0.2")
    _regraded(url, image_id, "stub-ensemble@0.0.2", gradable=True)
    with session_scope(url) as s:
        shown = repo.get_prediction(s, image_id)
        assert shown is not None and shown.model_version_id != _version(s, a.ref)  # B's, activated
        repo.activate_release(s, a.ref)  # the rollback
    with session_scope(url) as s:
        shown = repo.get_prediction(s, image_id)
        assert shown is not None and shown.model_version_id == _version(s, a.ref)
        assert repo.predictions_for_images(s, [image_id])[image_id].id == shown.id
        heatmap = repo.current_explanation(s, image_id)
        assert heatmap is not None and heatmap.stored_path == drawn
    assert explain_mod.explain_image(image_id, ensemble=a, store=store, db_url=url) == drawn
    body = client.get(f"/v1/images/{image_id}", headers=key.headers).json()
    assert body["model_version"] == a.ref
    assert client.get(f"/v1/images/{image_id}/explanation", headers=key.headers).status_code == 200


def _version(session: object, ref: str) -> int:
    row = repo.get_model_version_by_ref(session, ref)  # type: ignore[arg-type]
    assert row is not None
    return row.id


def test_after_a_rollback_the_activated_releases_quality_verdict_is_the_one_used(
    url: str, client: TestClient
) -> None:
    """Session 30's leftover: ``image.gradable`` is the verdict of the photograph's latest grading.
    A graded X gradable, B (activated) found it ungradable, the operator rolled back to A: the
    photograph showed A's grade as "ungradable", had no heatmap (the API's 404 and the worker
    refused to draw one) and A's patient rule counted it ungradable (the patient referred as
    ungradable). The verdict used is the one of the grading shown or applied."""
    a = StubEnsemble()
    store, key, image_id = _graded(url, "P-21", a)
    with session_scope(url) as s:
        repo.activate_release(s, "stub-ensemble@0.0.2")
    _regraded(url, image_id, "stub-ensemble@0.0.2", gradable=False)
    with session_scope(url) as s:
        repo.activate_release(s, a.ref)  # the rollback
        image = repo.get_image(s, image_id)
        assert image is not None and image.gradable is False  # B's verdict, the latest grading's
        shown = repo.get_prediction(s, image_id)
        assert shown is not None and shown.gradable and shown.grade is not None
        a_grade = shown.grade
        result = repo.recompute_patient(
            s, image.patient_id, model_version_id=_version(s, a.ref), grade_fn=a.grade_from_probabilities
        )
        assert result.gradable and result.grade == a_grade
    body = client.get(f"/v1/images/{image_id}", headers=key.headers).json()
    assert body["model_version"] == a.ref and body["gradable"] is True and body["grade"] == a_grade
    assert body["quality"] is None  # B's report ("ungradable") would contradict the grade shown
    assert client.get(f"/v1/images/{image_id}/explanation", headers=key.headers).status_code == 409
    drawn = explain_mod.explain_image(image_id, ensemble=a, store=store, db_url=url)
    assert drawn is not None
    assert client.get(f"/v1/images/{image_id}/explanation", headers=key.headers).status_code == 200
    page = client.get(f"/images/{image_id}", headers=web_cookie(client, key))
    assert page.status_code == 200 and f"/images/{image_id}/heatmap" in page.text
