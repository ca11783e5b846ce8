"""``GET /v1/jobs/{id}/patients``: a folder job's patients and their referral decisions."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from core.settings import get_settings
from core.store import FileStore
from tests.api_support import make_key, web_cookie
from tests.unit.test_workers_folders import make_folder
from tests.unit.test_workers_scoring import Sent, StubEnsemble
from workers import folders, scoring


def test_a_jobs_patients_carry_the_referral_decision(url: str, roots: Path, client: Any) -> None:
    """The clinician's review (session 29): a folder job gave per-photograph rows only, and a
    patient with one eye, or one ungradable photograph, read "referable: false" on every row of the
    job's CSV while GET /v1/patients said REFER. ``/v1/jobs/{id}/patients`` gives the decision."""
    store, ens = FileStore(get_settings().store_path), StubEnsemble()
    key = make_key(url, "North")
    folder = make_folder(roots)
    created = client.post("/v1/jobs", headers=key.headers, json={"folder": str(folder)})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    sent = Sent()
    folders.expand_folder(job_id, db_url=url, store=store, enqueue=sent, chunk=4)
    for _, args, _ in sent:
        scoring.score_images(args[0], explain=False, ensemble=ens, store=store, db_url=url, enqueue=Sent())

    page = client.get(f"/v1/jobs/{job_id}/patients", headers=key.headers).json()
    assert page["total"] == 4 and page["next_offset"] is None
    by_id = {p["patient_id"]: p for p in page["items"]}
    assert list(by_id) == ["102", "16", "17", "21"]  # the job's files in order (sorted names)
    for patient_id, row in by_id.items():  # the same decision as the patient's own endpoint
        own = client.get(f"/v1/patients/{patient_id}", headers=key.headers).json()
        assert (row["referable"], row["grade"], row["referral_reasons"]) == (
            own["referable"], own["grade"], own["referral_reasons"],
        )  # fmt: skip
        assert row["history"] == []
    # 21: its only (left) photograph truncated, its right eye never photographed: referred
    assert by_id["21"]["referable"] is True
    assert by_id["21"]["referral_reasons"] == ["left_eye_ungradable", "right_eye_not_photographed"]

    paged = client.get(f"/v1/jobs/{job_id}/patients?limit=3&offset=2", headers=key.headers).json()
    assert [p["patient_id"] for p in paged["items"]] == ["17", "21"] and paged["next_offset"] is None
    answer = client.get(f"/v1/jobs/{job_id}/patients?format=csv", headers=key.headers)
    rows = list(csv.DictReader(answer.text.splitlines()))
    assert answer.headers["content-type"].startswith("text/csv")
    assert [(r["patient_id"], r["referable"]) for r in rows] == [
        (p, str(by_id[p]["referable"]).lower()) for p in by_id
    ]
    assert rows[3]["referral_reasons"] == "left_eye_ungradable;right_eye_not_photographed"
    web = client.get(f"/jobs/{job_id}/patients.csv", headers={"Cookie": web_cookie(client, key)["Cookie"]})
    assert web.status_code == 200 and web.text == answer.text
    other = make_key(url, "South")
    assert client.get(f"/v1/jobs/{job_id}/patients", headers=other.headers).status_code == 404


def test_a_patient_whose_job_files_all_failed_is_not_cleared_by_an_earlier_result(
    url: str, roots: Path, client: Any
) -> None:
    """The session-29 review: a patient screened before with no referral, whose every file in the
    job failed, read `referable: false` on the job's list of who to refer."""
    from tests.unit.test_patient_summary import GradeStub
    from tests.unit.test_workers_scoring import add_images, photo

    store = FileStore(get_settings().store_path)
    key = make_key(url, "North")
    earlier = add_images(url, store, "16", [photo("16_left.jpg"), photo("16_right.jpg")])
    scoring.score_images(earlier, ensemble=GradeStub(grade=0), store=store, db_url=url, enqueue=Sent())
    assert client.get("/v1/patients/16", headers=key.headers).json()["referable"] is False
    folder = roots / "today"
    folder.mkdir()
    (folder / "16_left.jpg").write_bytes(b"not a photograph")
    (folder / "16_right.jpg").write_bytes(b"")
    job_id = client.post("/v1/jobs", headers=key.headers, json={"folder": str(folder)}).json()["id"]
    folders.expand_folder(job_id, db_url=url, store=store, enqueue=Sent(), chunk=4)
    [row] = client.get(f"/v1/jobs/{job_id}/patients", headers=key.headers).json()["items"]
    assert (row["patient_id"], row["referable"], row["referral_reasons"]) == ("16", True, ["not_graded_yet"])
    assert set(row["eyes"]) == {"left", "right"}
