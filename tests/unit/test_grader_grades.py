"""Graders' grades (``PUT/DELETE /v1/images/{id}/grader-grade``) and the agreement of a release with
them (``GET /v1/agreement``): the arithmetic against independent references, then the API on the
embedded database with photographs scored by the stand-in ensemble."""

from __future__ import annotations

import random
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import cohen_kappa_score, confusion_matrix
from sqlalchemy import select, update

from core import agreement, grading_queue
from core import repository as repo
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import SAMPLE_KEYS, AuditEvent, GraderGrade, Image, Prediction, new_id, new_sample_key
from tests.api_support import Key, make_key, sample_bytes
from tests.unit.test_workers_scoring import Sent, StubEnsemble, add_images
from workers import scoring

# ------------------------------------------------------------------------------------ arithmetic


def test_quadratic_kappa_matches_scikit_learn() -> None:
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(2, 60)
        a = [rng.randint(0, 4) for _ in range(n)]
        b = [min(4, max(0, x + rng.choice((-1, 0, 0, 1, 2)))) for x in a]
        matrix = confusion_matrix(a, b, labels=range(5)).tolist()
        expected = cohen_kappa_score(a, b, weights="quadratic", labels=list(range(5)))
        got = agreement.quadratic_kappa(matrix)
        if expected != expected:  # NaN: both raters constant
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-4)


def test_kappa_is_undefined_below_two_photographs_and_for_one_shared_grade() -> None:
    empty = [[0] * 5 for _ in range(5)]
    assert agreement.quadratic_kappa(empty) is None
    one = [row[:] for row in empty]
    one[2][2] = 1
    assert agreement.quadratic_kappa(one) is None
    one[2][2] = 9  # both said 2 every time: chance agreement is total
    assert agreement.quadratic_kappa(one) is None


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553..0.3662 and
    # 15/148 -> 0.0624..0.1605; and the degenerate 0/10 -> 0..0.2775
    assert agreement._interval(81, 263) == (0.308, [0.2553, 0.3662])
    assert agreement._interval(15, 148) == (0.1014, [0.0624, 0.1605])
    assert agreement._interval(0, 10) == (0.0, [0.0, 0.2775])
    assert agreement._interval(0, 0) == (None, None)


def P(
    image_id: str, grader_grade: int | None, model: int | None, referable: bool | None = None
) -> agreement.Pair:
    refers = referable if referable is not None else (model is None or model >= 2)
    return agreement.Pair(image_id, grader_grade, model, refers)


def test_summary_counts_referral_from_the_models_decision_and_ungradable_as_referral() -> None:
    pairs = [
        P("a", 0, 0),
        P("b", 1, 2),  # the model over-refers
        P("c", 2, 1),  # missed
        P("d", 3, None),  # the model could not grade it: refers, so not missed
        P("e", 4, 4),
        P("f", None, 0),  # the grader could not grade it: left out of referral and kappa
        P("g", None, None),
        P("h", 2, 2, referable=False),  # grade 2 under a decision that did not refer: missed
        P("i", 0, 1, referable=True),  # a decision that refers below 2 (sensitivity first)
    ]
    out = agreement.summarise(agreement.tally(pairs), awaiting=3)
    assert out.n_images == 9 and out.n_awaiting_model == 3
    assert out.n_both_gradable == 6  # a, b, c, e, h, i
    assert out.confusion_matrix[1][2] == 1 and out.confusion_matrix[2][1] == 1
    assert out.confusion_matrix[2][2] == 1 and out.confusion_matrix[0][1] == 1
    assert sum(map(sum, out.confusion_matrix)) == 6
    assert out.exact_agreement == pytest.approx(round(3 / 6, 4))
    r = out.referable
    assert (r.true_positive, r.false_negative, r.true_negative, r.false_positive) == (
        2,
        2,
        1,
        2,
    )  # TP d, e; FN c, h; TN a; FP b, i
    assert r.sensitivity == pytest.approx(0.5) and r.specificity == pytest.approx(round(1 / 3, 4))
    assert (out.ungradable.both, out.ungradable.grader_only, out.ungradable.model_only) == (1, 1, 1)


def test_summary_of_nothing() -> None:
    out = agreement.summarise({})
    assert out.n_images == 0 and out.qwk is None and out.exact_agreement is None
    assert out.referable.sensitivity is None and out.referable.sensitivity_ci95 is None


# ------------------------------------------------------------------------------------------- API


@pytest.fixture
def scored(url: str) -> tuple[Key, Key, list[str]]:
    """Three photographs of North's patient 16 and 229, scored; North's and South's keys."""
    north, south = make_key(url, "North"), make_key(url, "South")
    store = FileStore(get_settings().store_path)
    files = [
        ("16l.jpg", sample_bytes("16", "left"), "left"),
        ("16r.jpg", sample_bytes("16", "right"), "right"),
    ]
    ids = add_images(url, store, "P16", files, clinic="North")
    ids += add_images(
        url, store, "P229", [("229.jpg", sample_bytes("229", "right"), "right")], clinic="North"
    )
    summary = scoring.score_images(ids, ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent())
    assert sorted(summary.scored) == sorted(ids)  # all gradable, so each has a model grade
    # what the stand-in's grades are (tests below rely on one non-referable photograph)
    with session_scope(url) as s:
        decided = {p.image_id: (p.grade, p.referable) for p in s.scalars(select(Prediction))}
    assert [decided[i] for i in ids] == [(0, False), (4, True), (4, True)]
    return north, south, ids


def _put(client: TestClient, key: Key, image_id: str, body: object) -> object:
    return client.put(f"/v1/images/{image_id}/grader-grade", headers=key.headers, json=body)


def test_a_grader_grade_is_recorded_shown_replaced_audited_and_deleted(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    first = client.put(
        f"/v1/images/{ids[0]}/grader-grade", headers=north.headers, json={"grade": 3, "grader": "Dr A"}
    )
    assert first.status_code == 200, first.text
    assert (
        first.json()["grade"] == 3 and first.json()["gradable"] is True and first.json()["grader"] == "Dr A"
    )
    image = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()
    assert image["grader_grade"]["grade"] == 3 and image["grade"] is not None  # the model's stays
    assert client.get(f"/v1/images/{ids[1]}", headers=north.headers).json()["grader_grade"] is None

    again = client.put(
        f"/v1/images/{ids[0]}/grader-grade", headers=north.headers, json={"grade": None, "grader": "  Dr B "}
    )
    assert again.status_code == 200
    assert again.json() | {"recorded_at": None} == {
        "grade": None, "gradable": False, "grader": "Dr B", "recorded_at": None
    }  # fmt: skip
    with session_scope(url) as s:
        assert len(s.scalars(select(GraderGrade)).all()) == 1  # replaced, not added
        events = s.scalars(
            select(AuditEvent).where(AuditEvent.action.like("grader_grade.%")).order_by(AuditEvent.id)
        ).all()
        assert [(e.action, e.target_id, e.detail) for e in events] == [
            ("grader_grade.record", ids[0], {"grade": 3, "previous": None}),
            ("grader_grade.record", ids[0], {"grade": "ungradable", "previous": 3}),
        ]

    gone = client.delete(f"/v1/images/{ids[0]}/grader-grade", headers=north.headers)
    assert gone.status_code == 204
    assert client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()["grader_grade"] is None
    twice = client.delete(f"/v1/images/{ids[0]}/grader-grade", headers=north.headers)
    assert twice.status_code == 404 and twice.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"grader": "Dr A"},  # an omitted grade is not "ungradable"
        {"grade": 5, "grader": "Dr A"},
        {"grade": -1, "grader": "Dr A"},
        {"grade": "2", "grader": "Dr A"},
        {"grade": 2.5, "grader": "Dr A"},
        {"grade": 2},
        {"grade": 2, "grader": ""},
        {"grade": 2, "grader": "   "},
        {"grade": 2, "grader": "Dr\nA"},
        {"grade": 2, "grader": "x" * 101},
        {"grade": 2, "grader": "Dr A", "note": "extra"},
        [2, "Dr A"],
    ],
)
def test_bad_grader_grades_are_refused_and_change_nothing(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]], body: object
) -> None:
    north, _, ids = scored
    answer = client.put(f"/v1/images/{ids[0]}/grader-grade", headers=north.headers, json=body)
    assert answer.status_code == 422, (body, answer.text)
    assert answer.json()["error"] == "invalid_input"
    with session_scope(url) as s:
        assert s.scalars(select(GraderGrade)).all() == []


def test_another_clinics_photograph_cannot_be_graded_read_or_ungraded(
    client: TestClient, scored: tuple[Key, Key, list[str]]
) -> None:
    north, south, ids = scored
    assert _put(client, north, ids[0], {"grade": 1, "grader": "Dr A"}).status_code == 200  # type: ignore[attr-defined]
    assert _put(client, south, ids[0], {"grade": 4, "grader": "Dr Z"}).status_code == 404  # type: ignore[attr-defined]
    assert client.delete(f"/v1/images/{ids[0]}/grader-grade", headers=south.headers).status_code == 404
    assert client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()["grader_grade"]["grade"] == 1
    south_view = client.get("/v1/agreement", headers=south.headers).json()
    assert south_view["n_images"] == 0 and south_view["n_awaiting_model"] == 0
    assert _put(client, north, "0" * 32, {"grade": 1, "grader": "Dr A"}).status_code == 404  # type: ignore[attr-defined]


def test_agreement_of_the_release_with_the_graders(
    client: TestClient, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    release = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()["model_version"]
    # the stand-in graded ids[0] 0 and ids[1] 4 (the fixture checks): the grader refers the
    # first (a miss), agrees on the second and cannot grade the third
    _put(client, north, ids[0], {"grade": 3, "grader": "Dr A"})
    _put(client, north, ids[1], {"grade": 4, "grader": "Dr A"})
    _put(client, north, ids[2], {"grade": None, "grader": "Dr A"})
    out = client.get("/v1/agreement", headers=north.headers).json()
    assert out["model_version"] is None and out["releases"] == {release: 3}  # the reported grades
    assert out["n_images"] == 3 and out["n_awaiting_model"] == 0 and out["n_both_gradable"] == 2
    expected = [[0] * 5 for _ in range(5)]
    expected[3][0] = expected[4][4] = 1
    assert out["confusion_matrix"] == expected
    assert out["qwk"] == pytest.approx(
        cohen_kappa_score([3, 4], [0, 4], weights="quadratic", labels=[0, 1, 2, 3, 4]), abs=1e-4
    )
    assert out["exact_agreement"] == 0.5
    assert out["ungradable"] == {"both": 0, "grader_only": 1, "model_only": 0}
    assert out["missed_referable"] == [ids[0]]
    assert out["referable"] | {"sensitivity_ci95": None, "specificity_ci95": None} == {
        "true_positive": 1, "false_negative": 1, "true_negative": 0, "false_positive": 0,
        "sensitivity": 0.5, "sensitivity_ci95": None, "specificity": None, "specificity_ci95": None,
    }  # fmt: skip

    named = client.get("/v1/agreement", headers=north.headers, params={"model": release}).json()
    assert named == out | {"model_version": release}
    unknown = client.get("/v1/agreement", headers=north.headers, params={"model": "nope@9"})
    assert unknown.status_code == 404
    later = client.get("/v1/agreement", headers=north.headers, params={"since": "2999-01-01T00:00:00"})
    assert later.json()["n_images"] == 0
    window = {"since": "2020-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}
    assert client.get("/v1/agreement", headers=north.headers, params=window).status_code == 422
    assert (
        client.get("/v1/agreement", headers=north.headers, params={"since": "yesterday"}).status_code == 422
    )
    assert client.get("/v1/agreement").status_code == 401
    # times beyond what UTC can hold were a 500 (the review)
    for edge in ({"since": "0001-01-01T00:00:00+00:01"}, {"until": "9999-12-31T23:59:59-01:00"}):
        assert client.get("/v1/agreement", headers=north.headers, params=edge).status_code == 422, edge


def test_erasing_the_patient_erases_the_grader_grades(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    _put(client, north, ids[0], {"grade": 2, "grader": "Dr A"})
    _put(client, north, ids[2], {"grade": 0, "grader": "Dr A"})
    erased = client.delete("/v1/patients/P16", headers=north.headers)
    assert erased.status_code == 200, erased.text
    assert erased.json()["rows"]["grader_grade"] == 1
    with session_scope(url) as s:
        assert [row.image_id for row in s.scalars(select(GraderGrade))] == [ids[2]]


def _gauge(text: str, name: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


def test_metrics_count_the_last_30_days_of_grader_grades_and_the_misses(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    system = client.app.state.metrics.system  # type: ignore[attr-defined]
    text = client.get("/metrics").text
    assert "\ndrscreen_grader_estimated_sensitivity_last_90d " not in text  # nothing graded: no estimate
    assert 'drscreen_grader_stratum_graded_last_90d{stratum="not_referred"} 0.0' in text
    system.settings = system.settings.model_copy(update={"grader_sample_percent": 100})
    for image_id in ids:
        _put(client, north, image_id, {"grade": 3, "grader": "Dr A"})
    missed = 1  # ids[0]: the stand-in graded it 0
    text = client.get("/metrics").text
    # referred ids[1], ids[2] both referable to the grader; the not-referred ids[0] too: 2 of 3
    assert _gauge(text, "drscreen_grader_estimated_sensitivity_last_90d") == pytest.approx(0.6667)
    assert 'drscreen_grader_stratum_graded_last_90d{stratum="referred"} 2.0' in text
    assert 'drscreen_grader_stratum_graded_last_90d{stratum="not_referred"} 1.0' in text
    assert _gauge(text, "drscreen_grader_graded_last_30d") == 3
    assert _gauge(text, "drscreen_grader_referable_last_30d") == 3
    assert _gauge(text, "drscreen_grader_missed_referable_last_30d") == missed
    # the "missed" alert reads when the newest miss was recorded (a count in a sliding window can
    # stay flat while a new miss comes in and an old one leaves: the review)
    assert abs(_gauge(text, "drscreen_grader_newest_miss_timestamp_seconds") - time.time()) < 60
    # the same as the agreement says; and a grade recorded 31 days ago is out of the window
    assert client.get("/v1/agreement", headers=north.headers).json()["referable"]["false_negative"] == missed
    with session_scope(url) as s:
        old = s.scalars(select(GraderGrade).where(GraderGrade.image_id == ids[0])).one()
        old.updated_at = old.updated_at - timedelta(days=31)
    text = client.get("/metrics").text
    assert _gauge(text, "drscreen_grader_graded_last_30d") == 2
    assert _gauge(text, "drscreen_grader_missed_referable_last_30d") == 0


# ------------------------------------------------------------- the grading queue and its sample


def _pairs(n: int, grader_grade: int | None, model: int, *, sampled: bool = True) -> list[agreement.Pair]:
    refers = model >= 2
    return [agreement.Pair(new_id(), grader_grade, model, refers, sampled) for _ in range(n)]


def test_the_estimate_scales_each_stratum_up_from_its_graded_photographs() -> None:
    """100 referred photographs (50 graded: 40 referable), 900 not referred (90 of its random
    sample graded: 3 referable); 5 more not-referred photographs graded outside the sample (all
    referable: a grader's hunch) are not random and must not move the estimate."""
    pairs = (
        _pairs(40, 3, 3)
        + _pairs(10, 0, 2)  # referred, grader finds no referable disease
        + _pairs(3, 2, 0)  # missed, in the sample
        + _pairs(87, 0, 0)
        + _pairs(5, 3, 1, sampled=False)
        + _pairs(1, None, 0)  # the grader could not grade it: no reference
    )
    totals = grading_queue.Strata(referred=100, not_referred=900)
    out = agreement.estimate(agreement.tally(pairs), totals, percent=10)
    # TP 100*40/50 = 80, FP 20, FN 900*3/90 = 30, TN 870
    assert out.sensitivity == round(80 / 110, 4) and out.specificity == round(870 / 890, 4)
    assert (out.referred.photographs, out.referred.graded) == (100, 50)
    assert (out.not_referred.photographs, out.not_referred.graded) == (900, 90)
    assert out.sensitivity_ci95 is not None and out.specificity_ci95 is not None
    low, high = out.sensitivity_ci95
    assert low < out.sensitivity < high and high - low > 0.3  # 3 misses found in 90: wide
    assert out.specificity_ci95[0] < out.specificity < out.specificity_ci95[1]
    assert agreement.estimate(agreement.tally(pairs), totals, percent=10) == out  # seeded
    naive = agreement.summarise(agreement.tally(pairs)).referable
    assert naive.sensitivity == round(40 / 48, 4)  # what the graded photographs alone suggest


def test_no_miss_found_in_a_small_sample_is_not_a_perfect_sensitivity() -> None:
    """20 sampled, none referable: the point estimate is 1.0, and its interval says how little
    20 photographs can tell about 900 (a resampling interval would have been [1, 1])."""
    pairs = _pairs(40, 3, 3) + _pairs(20, 0, 0)
    out = agreement.estimate(agreement.tally(pairs), grading_queue.Strata(100, 900), percent=10)
    assert out.sensitivity == 1.0 and out.sensitivity_ci95 is not None
    assert out.sensitivity_ci95[0] < 0.7 and out.sensitivity_ci95[1] > 0.99


def test_the_estimate_is_unknown_without_a_graded_sample() -> None:
    pairs = _pairs(10, 3, 3)
    unknown = agreement.estimate(agreement.tally(pairs), grading_queue.Strata(10, 500), percent=10)
    assert unknown.sensitivity is None and unknown.specificity is None
    nothing_unreferred = agreement.estimate(agreement.tally(pairs), grading_queue.Strata(10, 0), percent=10)
    assert nothing_unreferred.sensitivity == 1.0 and nothing_unreferred.specificity is None


def test_the_sample_is_the_share_asked_for_drawn_by_secret_keys_not_ids(
    url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    """The review: drawn from the id, the sample told a grader who knew the rule which of the
    photographs in the list were referrals (the id is on every page). Drawn from a secret key:
    the same share, SQL agreeing with Python, and the id says nothing."""
    keys = [new_sample_key() for _ in range(40_000)]
    for percent in (0, 2.5, 10, 50, 100):
        share = sum(grading_queue.in_sample(k, percent) for k in keys) / len(keys)
        assert share == pytest.approx(percent / 100, abs=0.01), percent
    _, _, ids = scored
    with session_scope(url) as s:
        stored = {i: s.get(Image, i).sample_key for i in ids}  # type: ignore[union-attr]
        assert all(key is not None for key in stored.values())  # written with the photograph
        for percent in [p / 2 for p in range(0, 201)]:
            in_sql = set(s.scalars(select(Image.id).where(grading_queue.sampled(percent))))
            assert in_sql == {i for i in ids if grading_queue.in_sample(stored[i], percent)}, percent
        # the same ids, keys swapped: the sample follows the keys
        first, last = ids[0], ids[-1]
        s.execute(update(Image).where(Image.id == first).values(sample_key=0))
        s.execute(update(Image).where(Image.id == last).values(sample_key=SAMPLE_KEYS - 1))
        assert set(s.scalars(select(Image.id).where(grading_queue.sampled(1)))) >= {first}
        assert last not in set(s.scalars(select(Image.id).where(grading_queue.sampled(99))))


def test_the_grading_queue_lists_referrals_and_the_sample_blind(
    client: TestClient, scored: tuple[Key, Key, list[str]]
) -> None:
    north, south, ids = scored  # the release referred ids[1] and ids[2], not ids[0]
    settings = client.app.state.settings  # type: ignore[attr-defined]
    client.app.state.settings = settings.model_copy(update={"grader_sample_percent": 0})  # type: ignore[attr-defined]
    queue = client.get("/v1/grading-queue", headers=north.headers).json()
    assert [item["image_id"] for item in queue["items"]] == ids[1:] and queue["total"] == 2
    # blind: nothing of the service's grade, not even a link to the result (the review)
    assert set(queue["items"][0]) == {"image_id", "patient_id", "eye", "received_at"}
    assert queue["next_offset"] is None
    client.app.state.settings = settings.model_copy(update={"grader_sample_percent": 100})  # type: ignore[attr-defined]
    every = client.get("/v1/grading-queue", headers=north.headers).json()
    assert [item["image_id"] for item in every["items"]] == ids and every["sample_percent"] == 100
    page = client.get("/v1/grading-queue", headers=north.headers, params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_offset"] == 2 and page["total"] == 3
    rest = client.get("/v1/grading-queue", headers=north.headers, params={"limit": 2, "offset": 2}).json()
    assert [item["image_id"] for item in rest["items"]] == ids[2:] and rest["next_offset"] is None
    _put(client, north, ids[1], {"grade": 4, "grader": "Dr A"})  # graded: leaves the queue
    after = client.get("/v1/grading-queue", headers=north.headers).json()
    assert [item["image_id"] for item in after["items"]] == [ids[0], ids[2]]
    assert client.get("/v1/grading-queue", headers=south.headers).json()["items"] == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}, {"offset": 2**31}):
        assert client.get("/v1/grading-queue", headers=north.headers, params=bad).status_code == 422
    # an offset past the databases' integers was a 500 here and on a job's results (the review)
    huge = {"offset": "99999999999999999999"}
    assert client.get(f"/v1/jobs/{'0' * 32}/results", headers=north.headers, params=huge).status_code == 422


def test_agreement_estimates_over_all_photographs_from_the_sample(
    client: TestClient, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    settings = client.app.state.settings  # type: ignore[attr-defined]
    client.app.state.settings = settings.model_copy(update={"grader_sample_percent": 100})  # type: ignore[attr-defined]
    _put(client, north, ids[1], {"grade": 4, "grader": "Dr A"})
    _put(client, north, ids[2], {"grade": 1, "grader": "Dr A"})
    partial = client.get("/v1/agreement", headers=north.headers).json()["estimated"]
    # ids[0], not referred, is ungraded: that stratum cannot be scaled up
    assert partial["sensitivity"] is None and partial["specificity"] is None
    assert partial["referred"] == {"photographs": 2, "graded": 2}
    assert partial["not_referred"] == {"photographs": 1, "graded": 0}
    _put(client, north, ids[0], {"grade": 2, "grader": "Dr A"})  # a miss, in the (whole) sample
    full = client.get("/v1/agreement", headers=north.headers).json()["estimated"]
    # TP 2*1/2 = 1, FP 1, FN 1*1/1 = 1, TN 0
    assert full["sensitivity"] == 0.5 and full["specificity"] == 0.0
    client.app.state.settings = settings.model_copy(update={"grader_sample_percent": 0})  # type: ignore[attr-defined]
    none_sampled = client.get("/v1/agreement", headers=north.headers).json()["estimated"]
    assert (
        none_sampled["not_referred"] == {"photographs": 1, "graded": 0}
        and none_sampled["sensitivity"] is None
    )


# --------------------------------------------------------------------- found by the review


def test_by_default_each_photograph_is_compared_with_the_grade_its_result_reports(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    """A newer release activated and grading one photograph again must not hide what the earlier
    release told the clinic about the others: their results still report its grades (the review:
    the default compared the active release only, and a miss the clinic was told went unlisted)."""
    north, _, ids = scored
    first = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()["model_version"]
    with session_scope(url) as s:
        newer = repo.activate_release(s, "stub-ensemble@0.0.2")
        probs = [0.0, 0.0, 0.0, 1.0, 0.0]
        repo.upsert_prediction(
            s,
            image_id=ids[1],
            model_version_id=newer.id,
            grade=3,
            probabilities=probs,
            members={},
            referable=True,
        )
    _put(client, north, ids[0], {"grade": 3, "grader": "Dr A"})  # the first release graded it 0
    _put(client, north, ids[1], {"grade": 3, "grader": "Dr A"})
    out = client.get("/v1/agreement", headers=north.headers).json()
    assert out["releases"] == {first: 1, "stub-ensemble@0.0.2": 1} and out["n_awaiting_model"] == 0
    assert out["missed_referable"] == [ids[0]] and out["confusion_matrix"][3][3] == 1
    metrics = client.get("/metrics").text
    assert _gauge(metrics, "drscreen_grader_missed_referable_last_30d") == 1
    newest = client.get(
        "/v1/agreement", headers=north.headers, params={"model": "stub-ensemble@0.0.2"}
    ).json()
    assert newest["n_images"] == 1 and newest["n_awaiting_model"] == 1 and newest["missed_referable"] == []


def test_after_a_rollback_graders_are_compared_with_the_activated_releases_grade(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    """Session 31: the default compared each photograph with its newest grading. After a rollback
    the clinic is shown the activated release's grade (``repository.get_prediction``), yet a newer
    release's "not referable" (or "ungradable") was counted as what the clinic was told."""
    north, _, ids = scored
    first = client.get(f"/v1/images/{ids[1]}", headers=north.headers).json()["model_version"]
    with session_scope(url) as s:
        newer = repo.activate_release(s, "stub-ensemble@0.0.2")
        repo.upsert_prediction(  # the newer release: grade 0 where the first said 4
            s, image_id=ids[1], model_version_id=newer.id, grade=0, probabilities=[1.0, 0.0, 0.0, 0.0, 0.0],
            members={}, referable=False,
        )  # fmt: skip
        repo.upsert_prediction(  # and ungradable where the first graded 4
            s, image_id=ids[2], model_version_id=newer.id, grade=None, probabilities=[0.2] * 5,
            members={}, referable=True, gradable=False,
        )  # fmt: skip
        image = repo.get_image(s, ids[2])
        assert image is not None
        repo.mark_image_done(s, image, quality={"gradable": False}, gradable=False)
        repo.activate_release(s, first)  # the rollback
    shown = client.get(f"/v1/images/{ids[1]}", headers=north.headers).json()
    assert shown["model_version"] == first and shown["grade"] == 4
    _put(client, north, ids[1], {"grade": 4, "grader": "Dr A"})
    _put(client, north, ids[2], {"grade": 4, "grader": "Dr A"})
    out = client.get("/v1/agreement", headers=north.headers).json()
    assert out["releases"] == {first: 2} and out["missed_referable"] == []
    assert out["confusion_matrix"][4][4] == 2
    metrics = client.get("/metrics").text
    assert _gauge(metrics, "drscreen_grader_missed_referable_last_30d") == 0


def test_a_retry_changes_nothing_and_the_missed_list_is_newest_first(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    north, _, ids = scored
    first = _put(client, north, ids[0], {"grade": 2, "grader": "Dr A"}).json()  # type: ignore[attr-defined]
    again = _put(client, north, ids[0], {"grade": 2, "grader": " Dr A "}).json()  # type: ignore[attr-defined]
    assert again == first  # the same time: a retry is not a new grade (it would re-fire the alert)
    with session_scope(url) as s:
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.action.like("grader_grade.%"))).all()
        assert actions == ["grader_grade.record"]
    # two misses: the one graded last is listed first
    with session_scope(url) as s:
        newer = repo.activate_release(s, "stub-ensemble@0.0.2")
        repo.upsert_prediction(
            s, image_id=ids[2], model_version_id=newer.id, grade=1, probabilities=[0.0, 1.0, 0.0, 0.0, 0.0],
            members={}, referable=False,
        )  # fmt: skip
    _put(client, north, ids[2], {"grade": 4, "grader": "Dr A"})
    assert client.get("/v1/agreement", headers=north.headers).json()["missed_referable"] == [ids[2], ids[0]]


@pytest.mark.parametrize(
    "name",
    [
        "A\u0085B",
        "A\u2028B",
        "A\u202eB",
        "A\u200bB",
        "\ufeffDr A",
        "A\ue000",
        "\u3164",
        "\u115f",
        "\u2800",
        "\u0301",
    ],
)
def test_grader_names_with_invisible_or_control_characters_are_refused(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]], name: str
) -> None:
    north, _, ids = scored
    answer = client.put(
        f"/v1/images/{ids[0]}/grader-grade", headers=north.headers, json={"grade": 1, "grader": name}
    )
    assert answer.status_code == 422, answer.text
    ok = client.put(
        f"/v1/images/{ids[0]}/grader-grade",
        headers=north.headers,
        json={"grade": 1, "grader": "Dr Ñúñez-Ødegård"},
    )
    assert ok.status_code == 200 and ok.json()["grader"] == "Dr Ñúñez-Ødegård"


def test_a_named_release_is_judged_by_its_own_quality_verdict(
    client: TestClient, url: str, scored: tuple[Key, Key, list[str]]
) -> None:
    """A later release's quality gate rejected a photograph the first release graded 0: asked for
    the first release, the agreement counts the 0 it gave (a miss here), not the later verdict
    (``image.gradable`` is the latest scoring's; session 26's leftover)."""
    north, _, ids = scored
    first = client.get(f"/v1/images/{ids[0]}", headers=north.headers).json()
    assert first["grade"] == 0 and first["gradable"] is True
    with session_scope(url) as s:
        newer = repo.activate_release(s, "stub-ensemble@0.0.2")
        repo.upsert_prediction(
            s, image_id=ids[0], model_version_id=newer.id, grade=None, probabilities=None, members={},
            referable=True, gradable=False,
        )  # fmt: skip
        s.execute(update(Image).where(Image.id == ids[0]).values(gradable=False))
    _put(client, north, ids[0], {"grade": 3, "grader": "Dr A"})
    reported = client.get("/v1/agreement", headers=north.headers).json()  # what the result says now
    assert reported["missed_referable"] == [] and reported["ungradable"]["model_only"] == 1
    named = client.get(
        "/v1/agreement", headers=north.headers, params={"model": first["model_version"]}
    ).json()
    assert named["missed_referable"] == [ids[0]] and named["ungradable"]["model_only"] == 0
    assert named["confusion_matrix"][3][0] == 1
