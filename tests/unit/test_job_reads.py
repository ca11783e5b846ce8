"""A folder job's read paths at clinic volume (the scale review): its patients, results, grade
counts and the jobs page read in a few statements, with the answers the per-patient, per-item
code gave. The old code is kept here as the oracle (``_*_one_by_one``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from core import db
from core import repository as repo
from core.db import session_scope
from core.repository import _sql as sql
from core.schemas import EyeSummary, PatientSummary
from core.tables import Image, ModelVersion, ScoringJob, ScoringJobItem, utcnow
from services.routes import jobs as job_routes
from services.views import patient_summary
from tests.api_support import make_key, web_cookie


def argmax(probabilities: Sequence[float]) -> int:
    return max(range(len(probabilities)), key=lambda g: probabilities[g])


@contextmanager
def statements(url: str) -> Iterator[list[str]]:
    """The SQL statements run on ``url``'s engine inside the block."""
    engine = db.get_engine(url)
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@dataclass
class World:
    """Rows built with the repository (no photographs decoded): fast, and every case on purpose."""

    s: Session
    clinic_id: int
    job_id: str
    releases: dict[str, ModelVersion] = field(default_factory=dict)

    def release(self, ref: str) -> ModelVersion:
        if ref not in self.releases:
            self.releases[ref] = repo.get_or_create_model_version(self.s, ref)
        return self.releases[ref]

    def patient(self, name: str, clinic_id: int | None = None) -> int:
        return repo.get_or_create_patient(self.s, clinic_id or self.clinic_id, name).id

    def photo(self, name: str, eye: str, *, days_ago: int = 0, clinic_id: int | None = None) -> Image:
        im = repo.create_image(
            self.s,
            clinic_id=clinic_id or self.clinic_id,
            patient_id=self.patient(name, clinic_id),
            eye=eye,
            sha256=uuid.uuid4().hex * 2,
            stored_path=f"aa/{uuid.uuid4().hex}.jpg",
            size_bytes=1,
            job_id=None if days_ago else self.job_id,  # an earlier visit came another way
        )
        if days_ago:
            im.created_at = utcnow() - timedelta(days=days_ago)
        # read back as the database gives them (SQLite: naive), as a worker's session would: the
        # visit rule compares them with the rows it loads
        self.s.flush()
        self.s.expire_all()
        return im

    def grade(self, im: Image, grade: int | None, ref: str = "ens@1") -> None:
        """``ref``'s grading of ``im`` (None: ungradable), as a worker writes it."""
        probs = [0.05] * 5
        probs[grade or 0] = 0.8
        repo.upsert_prediction(
            self.s,
            image_id=im.id,
            model_version_id=self.release(ref).id,
            grade=grade,
            probabilities=probs,
            members={"m@1": probs},
            referable=grade is None or grade >= 2,
            gradable=grade is not None,
        )
        quality = {"gradable": grade is not None, "reasons": [] if grade is not None else ["blurred"]}
        repo.mark_image_done(self.s, im, quality=quality, gradable=grade is not None)

    def result(self, name: str, ref: str = "ens@1", days_ago: int = 0) -> None:
        pid = self.patient(name)
        row = repo.recompute_patient(
            self.s, pid, model_version_id=self.release(ref).id, grade_fn=argmax, trigger=f"job:{name}"
        )
        if days_ago:
            row.computed_at = utcnow() - timedelta(days=days_ago)
            self.s.flush()

    def item(self, path: str, patient: str | None, eye: str | None, im: Image | None, status: str) -> None:
        repo.add_job_items(self.s, self.job_id, [repo.JobItemSpec(path, patient, eye)])
        [row] = [i for i in repo.job_items(self.s, self.job_id) if i.path == path]
        error = "could not decode the photograph" if status == "failed" else None
        repo.set_job_item(self.s, row, status=status, image_id=im.id if im else None, error=error)


def build_job(url: str, clinic: str = "North") -> tuple[int, str]:
    """A job naming patients in every state a clinic meets: (clinic id, job id)."""
    with session_scope(url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        other = repo.get_or_create_clinic(s, f"{clinic} (other)")
        w = World(s, c.id, repo.create_job(s, c.id, "/data/today").id)
        # 31: two visits a year apart (the earlier one graded by another release), both eyes today
        old = [w.photo("31", "left", days_ago=400), w.photo("31", "right", days_ago=400)]
        for im in old:
            w.grade(im, 0, "ens@0")
        w.result("31", "ens@0", days_ago=400)
        left, right = w.photo("31", "left"), w.photo("31", "right")
        w.grade(left, 3)
        w.grade(right, 0)
        w.result("31")
        w.photo("31", "left", clinic_id=other.id)  # another clinic's patient 31: not this one
        w.item("a/31_left.jpg", "31", "left", left, "done")
        w.item("a/notes.txt", None, None, None, "failed")
        # 7: one eye only
        seven = w.photo("7", "left")
        w.grade(seven, 1)
        w.result("7")
        w.item("a/7_left.jpg", "7", "left", seven, "done")
        w.item("a/31_right.jpg", "31", "right", right, "done")
        # 12: ungradable photographs (one eye ungradable, the other graded)
        ung, ok = w.photo("12", "left"), w.photo("12", "right")
        w.grade(ung, None)
        w.grade(ok, 0)
        w.result("12")
        w.item("a/12_left.jpg", "12", "left", ung, "done")
        w.item("a/12_right.jpg", "12", "right", ok, "done")
        # 40: no readable file today; cleared at an earlier screening (not cleared by it now)
        for eye in ("left", "right"):
            earlier = w.photo("40", eye, days_ago=300)
            w.grade(earlier, 0)
        w.result("40", days_ago=300)
        w.item("a/40_left.jpg", "40", "left", None, "failed")
        w.item("a/40_right.jpg", "40", "right", None, "failed")
        # 41: never seen, its file unreadable (no patient row)
        w.item("a/41_left.jpg", "41", "left", None, "failed")
        # 5: graded, then a second left photograph still being scored
        five = [w.photo("5", "left"), w.photo("5", "right")]
        for im in five:
            w.grade(im, 0)
        w.result("5")
        pending = w.photo("5", "left")
        w.item("a/5_left.jpg", "5", "left", five[0], "done")
        w.item("a/5_left_2.jpg", "5", "left", pending, "queued")
        # 6: nothing graded yet
        six = w.photo("6", "right")
        w.item("a/6_right.jpg", "6", "right", six, "queued")
        # 8: one photograph named twice (byte-identical files: one image, two items), graded 4
        eight = w.photo("8", "left")
        w.grade(eight, 4)
        w.result("8")
        w.item("a/8_left.jpg", "8", "left", eight, "done")
        w.item("b/8_left.jpg", "8", "left", eight, "done")
        # 9: its photograph could not be scored
        nine = w.photo("9", "right")
        repo.mark_image_failed(s, nine, "could not decode the photograph")
        w.result("9")
        w.item("a/9_right.jpg", "9", "right", nine, "failed")
        # 50: screened 200 days ago; today's photograph still queued (its result is the earlier visit's)
        for eye in ("left", "right"):
            w.grade(w.photo("50", eye, days_ago=200), 0)
        w.result("50", days_ago=200)
        fifty = w.photo("50", "left")
        w.item("a/50_left.jpg", "50", "left", fifty, "queued")
        # 5's right eye re-graded by a newer release (its decision stays the first one's result)
        w.grade(five[1], 2, "ens@2")
        repo.refresh_job_counts(s, w.job_id)
        return c.id, w.job_id


# ---------------------------------------------------------------------------- counts, grades, failures


def _item_graded_one_by_one(item_status: str | None, image_status: str | None, *, job_open: bool) -> bool:
    if item_status == "failed" or image_status == "failed":
        return False
    return image_status == "done" or (not job_open and item_status == "done")


def _counts_one_by_one(session: Session, job_id: str) -> tuple[tuple[int, int, int], dict[str, int]]:
    """(total, done, failed) and the grade counts as refresh_job_counts and job_grade_counts read
    them before they were counted in SQL (every item, every prediction loaded)."""
    job = session.get(ScoringJob, job_id)
    job_open = job is None or job.status in repo.OPEN_JOB_STATES
    rows = session.execute(
        select(ScoringJobItem.status, Image.status, Image.id)
        .outerjoin(Image, Image.id == ScoringJobItem.image_id)
        .where(ScoringJobItem.job_id == job_id)
    ).all()
    failed = sum(1 for a, b, _ in rows if a == "failed" or b == "failed")
    graded = [i for a, b, i in rows if i is not None and _item_graded_one_by_one(a, b, job_open=job_open)]
    done = sum(1 for a, b, _ in rows if _item_graded_one_by_one(a, b, job_open=job_open))
    counts = {str(g): 0 for g in range(5)} | {"ungradable": 0}
    preds = repo.predictions_for_images(session, sorted(set(graded)))
    for image_id in graded:
        pred = preds.get(image_id)
        if pred is not None:
            counts["ungradable" if pred.grade is None else str(pred.grade)] += 1
    return (len(rows), done, failed), counts


def test_counts_and_grades_counted_in_sql_are_the_per_item_ones(url: str) -> None:
    """refresh_job_counts and job_grade_counts, open and finished, through a newer release grading
    a photograph again and a rollback to an earlier release (the grade shown: the activated
    release's where it graded the photograph, else the newest)."""
    _, job_id = build_job(url)

    def check(label: str) -> None:
        with session_scope(url) as s:
            want_counts, want_grades = _counts_one_by_one(s, job_id)
            job = repo.refresh_job_counts(s, job_id)
            assert (job.total, job.done, job.failed) == want_counts, label
            assert repo.job_grade_counts(s, job_id) == want_grades, label
            assert repo.jobs_grade_counts(s, [job_id, "nosuchjob"]) == {
                job_id: want_grades,
                "nosuchjob": dict.fromkeys(want_grades, 0),
            }, label
            assert sum(want_grades.values()) == job.done, label

    check("open, nothing activated")
    with session_scope(url) as s:
        assert repo.refresh_job_counts(s, job_id).status == "running"  # 5 and 6 are queued
        w = World(s, 0, job_id)
        for image in s.scalars(select(Image).where(Image.status == "queued")):
            w.grade(image, 2)
        assert repo.refresh_job_counts(s, job_id).status == "done"
    check("finished")
    with session_scope(url) as s:
        repo.activate_release(s, "ens@2")
        eight = s.scalars(select(ScoringJobItem.image_id).where(ScoringJobItem.path == "a/8_left.jpg")).one()
        image = s.get(Image, eight)
        assert image is not None
        repo.requeue_image(s, image)  # ens@2 grades it again: the finished job's grade stands
    check("finished, a photograph being graded again")
    with session_scope(url) as s:
        w = World(s, 0, job_id)
        image = s.get(Image, eight)
        assert image is not None
        w.grade(image, 1, "ens@2")
    check("graded again by the activated release")
    with session_scope(url) as s:
        repo.activate_release(s, "ens@1")  # rolled back: ens@1's grade where it graded them
    check("rolled back")
    with session_scope(url) as s:
        s.execute(update(ScoringJob).where(ScoringJob.id == job_id).values(status="running"))
    check("open again (a photograph re-sent)")


def test_failures_of_several_jobs_in_one_statement(url: str) -> None:
    """The first ``limit`` failed files of each job in file order, with the file's refusal, else
    its photograph's scoring failure, else "failed"."""
    _, job_id = build_job(url)
    with session_scope(url) as s:
        clinic_id = repo.get_or_create_clinic(s, "North").id
        bare = repo.create_job(s, clinic_id, "/data/empty").id
        w = World(s, clinic_id, bare)
        for k in range(4):
            w.item(f"z/{k}.txt", None, None, None, "failed")
        [first] = [i for i in repo.job_items(s, bare) if i.path == "z/0.txt"]
        first.error = None
        s.flush()
    with session_scope(url) as s, statements(url) as seen:
        got = repo.jobs_failures(s, [job_id, bare, "nosuchjob"], limit=3)
    assert len(seen) == 1
    assert got["nosuchjob"] == []
    assert got[bare] == [("z/0.txt", "failed")] + [
        (f"z/{k}.txt", "could not decode the photograph") for k in (1, 2)
    ]
    assert [path for path, _ in got[job_id]] == ["a/notes.txt", "a/40_left.jpg", "a/40_right.jpg"]
    with session_scope(url) as s:
        assert repo.job_failures(s, job_id) == [
            ("a/notes.txt", "could not decode the photograph"),
            ("a/40_left.jpg", "could not decode the photograph"),
            ("a/40_right.jpg", "could not decode the photograph"),
            ("a/41_left.jpg", "could not decode the photograph"),
            ("a/9_right.jpg", "could not decode the photograph"),
        ]


def test_the_jobs_page_reads_the_same_statements_for_three_jobs_as_for_six(
    url: str, client: TestClient
) -> None:
    """The review: 197 statements for 50 jobs (grades and failures read job by job)."""
    key = make_key(url, "North")
    cookie = web_cookie(client, key)

    def jobs_page() -> tuple[int, str]:
        with statements(url) as seen:
            page = client.get("/jobs", headers=cookie)
        assert page.status_code == 200
        return len(seen), page.text

    def finished_jobs(n: int) -> None:  # an open job is recounted (one statement each) as before
        for _ in range(n):
            _, job_id = build_job(url)
            with session_scope(url) as s:
                s.execute(update(ScoringJob).where(ScoringJob.id == job_id).values(status="done"))

    finished_jobs(3)
    three, _ = jobs_page()
    finished_jobs(3)
    six, html = jobs_page()
    assert six <= three <= 12, (three, six)  # the first may also mark the key used
    assert html.count('data-testid="job"') == 6 and html.count('data-testid="job-failures"') == 6
    assert html.count("<code>a/40_right.jpg</code>: could not decode the photograph") == 6
    assert html.count(">4: 2</span>") == 6  # 8's photograph, named twice


# ---------------------------------------------------------------------------- the job's results

PAGES = [(0, None), (0, 1000), (0, 3), (2, 4), (5, 2), (9, 5), (20, 10)]


def _many_patients_job(url: str, clinic: str, n: int) -> str:
    """A job of ``n`` patients, both eyes each, graded by two releases (half each)."""
    with session_scope(url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        w = World(s, c.id, repo.create_job(s, c.id, "/data/many").id)
        for k in range(n):
            name, ref = f"P{k}", ("ens@1" if k % 2 else "ens@2")
            for eye in ("left", "right"):
                im = w.photo(name, eye)
                w.grade(im, k % 5, ref)
                w.item(f"x/{name}_{eye}.jpg", name, eye, im, "done")
            w.result(name, ref)
        repo.refresh_job_counts(s, w.job_id)
        return w.job_id


def test_a_results_page_is_cut_in_sql_in_file_order(url: str, client: TestClient) -> None:
    """Each page is the matching slice of every row (as the whole list was sliced before), and the
    photographs' patients are read in one query, not one per patient (4,750 for a 10,000-file CSV)."""
    key = make_key(url, "North")
    _, job_id = build_job(url)
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None
        total, every = job_routes._rows(s, job, 0, None)
    assert total == 16 and [r.file for r in every][:3] == ["a/31_left.jpg", "a/notes.txt", "a/7_left.jpg"]
    for offset, limit in PAGES:
        with session_scope(url) as s:
            job = repo.get_job(s, job_id)
            assert job is not None
            page_total, page = job_routes._rows(s, job, offset, limit)
        assert page_total == total
        want = every[offset : None if limit is None else offset + limit]
        assert [r.model_dump() for r in page] == [r.model_dump() for r in want]
    assert {r.patient_id for r in every if r.image_id} == {"31", "7", "12", "5", "6", "8", "9", "50"}

    many = _many_patients_job(url, "North", 50)
    for query in ("limit=5", "limit=100", "format=csv"):
        with statements(url) as seen:
            answer = client.get(f"/v1/jobs/{many}/results?{query}", headers=key.headers)
        assert answer.status_code == 200, answer.text
        assert len(seen) <= 15, (query, len(seen))  # one per patient before: 4,750 for the review's CSV
    last = client.get(f"/v1/jobs/{many}/results?offset=99", headers=key.headers).json()
    assert (last["total"], [r["file"] for r in last["items"]]) == (100, ["x/P49_right.jpg"])


# ---------------------------------------------------------------------------- the job's patients


def _patient_rows_one_by_one(
    session: Session, job: ScoringJob, offset: int, limit: int | None
) -> tuple[int, list[PatientSummary]]:
    """services.routes.jobs._patient_rows before the batching (five queries per patient)."""
    items = repo.job_items(session, job.id)
    stored: dict[str, bool] = {}
    for item in items:
        if item.patient_external_id is not None:
            stored[item.patient_external_id] = stored.get(item.patient_external_id, False) or bool(
                item.image_id
            )
    names = list(stored)
    rows = []
    for name in names[offset : None if limit is None else offset + limit]:
        patient = repo.get_patient(session, job.clinic_id, name) if stored[name] else None
        if patient is None:
            summary = PatientSummary(patient_id=name, referral_reasons=["not_graded_yet"])
            summary.eyes = {"left": EyeSummary(), "right": EyeSummary()}
        else:
            summary = patient_summary(session, patient)
        summary.history = []
        rows.append(summary)
    return len(names), rows


@pytest.mark.parametrize("in_batch", [1000, 2])
def test_the_batched_patients_list_is_the_per_patient_one(
    url: str, in_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content and order, JSON and CSV, page by page: one eye, ungradable photographs, a patient
    with no readable file (and a clearing earlier result), one never seen, several visits, a
    photograph pending, a photograph named twice, another clinic's patient of the same id. Also
    with the IN lists cut in twos (a CSV of thousands of patients reads them a thousand at a time)."""
    _, job_id = build_job(url)
    monkeypatch.setattr(sql, "IN_BATCH", in_batch)
    for offset, limit in PAGES:
        with session_scope(url) as s:  # separate sessions: no row loaded by one path serves the other
            job = repo.get_job(s, job_id)
            assert job is not None
            want_total, want = _patient_rows_one_by_one(s, job, offset, limit)
        with session_scope(url) as s:
            job = repo.get_job(s, job_id)
            assert job is not None
            total, rows = job_routes._patient_rows(s, job, offset, limit)
        assert total == want_total == 10
        assert [r.model_dump(mode="json") for r in rows] == [r.model_dump(mode="json") for r in want]
        assert job_routes._patients_csv(rows) == job_routes._patients_csv(want)
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None
        by_id = {r.patient_id: r for r in job_routes._patient_rows(s, job, 0, None)[1]}
    # the cases are what the test means them to be
    assert list(by_id) == ["31", "7", "12", "40", "41", "5", "6", "8", "9", "50"]
    assert (by_id["31"].grade, by_id["31"].model_version) == (3, "ens@1")
    assert by_id["7"].referral_reasons == ["right_eye_not_photographed"]
    assert by_id["12"].referral_reasons == ["left_eye_ungradable"]
    assert by_id["40"].referral_reasons == by_id["41"].referral_reasons == ["not_graded_yet"]
    assert by_id["5"].referral_reasons == ["left_eye_pending"] and len(by_id["5"].eyes["left"].image_ids) == 2
    assert by_id["6"].updated_at is None and by_id["8"].grade == 4
    assert (by_id["50"].updated_at, by_id["50"].referral_reasons) == (
        None,
        ["not_graded_yet", "left_eye_pending"],
    )


def test_a_jobs_patients_page_reads_a_bounded_number_of_statements(url: str, client: TestClient) -> None:
    """The review: a page of 200 patients issued 1,130 statements (five per patient, and each
    release's name read again). A page of 5, a page of 50 and the CSV now read a few each."""
    key = make_key(url, "North")
    job_id = _many_patients_job(url, "North", 50)
    counts = {}
    for query in ("limit=5", "limit=50", "format=csv"):
        with statements(url) as seen:
            answer = client.get(f"/v1/jobs/{job_id}/patients?{query}", headers=key.headers)
        assert answer.status_code == 200, answer.text
        counts[query] = len(seen)
    assert max(counts.values()) <= 15, counts
    page = client.get(f"/v1/jobs/{job_id}/patients?limit=50", headers=key.headers).json()
    assert page["total"] == 50 and [p["patient_id"] for p in page["items"]][:3] == ["P0", "P1", "P2"]
    assert {p["model_version"] for p in page["items"]} == {"ens@1", "ens@2"}
