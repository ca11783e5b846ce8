"""The API's edges on the embedded defaults (SQLite file, filesystem broker; no worker needed):
auth, bad input leaving no rows, limits, import roots, idempotency, the audit of uploads, the web
progress route, OpenAPI, health and metrics."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import session_scope
from core.settings import Settings, get_settings
from core.tables import AuditEvent, Bundle, IdempotencyKey, Image, Patient, ScoringJob
from services.app import create_app
from services.config import get_api_settings
from tests.api_support import Key, bad_files, make_key, png_bytes, revoke, sample_bytes, web_cookie

CONTRACT_PATHS = {
    "/v1/images": {"post"},
    "/v1/images/{image_id}": {"get"},
    "/v1/images/{image_id}/explanation": {"get"},
    "/v1/bundles": {"post"},
    "/v1/bundles/{bundle_id}": {"get"},
    "/v1/jobs": {"post"},
    "/v1/jobs/{job_id}": {"get"},
    "/v1/jobs/{job_id}/results": {"get"},
    "/v1/patients/{patient_id}": {"get"},
    "/v1/models": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
    "/metrics": {"get"},
}


@pytest.fixture
def key(url: str) -> Key:
    return make_key(url, "North clinic")


def _count(url: str, table: type) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _upload(client: TestClient, key: Key, data: bytes, **form: str) -> Any:
    fields = {"patient_id": "p-1", "eye": "left"} | form
    return client.post("/v1/images", headers=key.headers, data=fields, files={"file": ("x.jpg", data)})


def test_health_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    for path, methods in CONTRACT_PATHS.items():
        assert methods <= set(spec["paths"][path]), path
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    get_image = spec["paths"]["/v1/images/{image_id}"]["get"]
    assert {"200", "401", "404"} <= set(get_image["responses"])
    assert get_image["security"] == [{"ApiKey": []}]
    assert "200" in spec["paths"]["/v1/images"]["post"]["responses"]  # the `wait` answer


def test_every_v1_endpoint_needs_a_valid_key(client: TestClient, url: str, key: Key) -> None:
    revoked = make_key(url, "North clinic")
    revoke(url, revoked)
    calls = [
        ("post", "/v1/images"),
        ("get", "/v1/images/abc"),
        ("get", "/v1/images/abc/explanation"),
        ("post", "/v1/bundles"),
        ("get", "/v1/bundles/abc"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/abc"),
        ("get", "/v1/jobs/abc/results"),
        ("get", "/v1/patients/p-1"),
        ("get", "/v1/models"),
    ]
    for headers in (
        {},
        {"Authorization": "Bearer drs_not-a-key"},
        revoked.headers,
        {"Authorization": "Basic x"},
    ):
        for method, path in calls:
            resp = client.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["error"] == "unauthorized"
            assert resp.headers["www-authenticate"] == "Bearer"


@pytest.fixture
def form_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests whose form (so whose body) the app parsed, in order."""
    import starlette.requests

    read: list[str] = []
    real_form = starlette.requests.Request._get_form

    async def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        read.append(self.url.path)
        return await real_form(self, *args, **kwargs)

    monkeypatch.setattr(starlette.requests.Request, "_get_form", spy)
    return read


def test_a_keyless_upload_is_refused_before_its_body_is_read(
    client: TestClient, url: str, form_reads: list[str]
) -> None:
    """The security review: the form was parsed before the key was checked, so anyone could make
    the API read (and spool to disk) a 100 MiB upload only to answer "missing API key"."""
    read = form_reads
    revoked = make_key(url, "North clinic")
    revoke(url, revoked)
    made_up = {"Authorization": "Bearer drs_made-up"}
    for headers in ({}, {"Authorization": "Basic x"}, {"Authorization": "Bearer "}, made_up, revoked.headers):
        resp = client.post(
            "/v1/images",
            headers=headers,
            data={"patient_id": "p-1", "eye": "left"},
            files={"file": ("x.jpg", b"\xff\xd8" + b"\0" * 100_000)},
        )
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized", headers
        assert resp.headers["www-authenticate"] == "Bearer"
    assert read == []


def test_a_signed_out_web_form_is_sent_to_sign_in_before_its_body_is_read(
    client: TestClient, key: Key, form_reads: list[str]
) -> None:
    """Session 24's leftover: the web upload forms read their body (up to 101 MiB, for anyone)
    before finding no sign-in; the edge now answers the login redirect first."""
    from services.web import SIGNED_IN_FORMS

    read = form_reads

    expected = {"/screenings/bundle", "/screenings/image", "/patients", "/patients/erase", "/jobs"}
    assert expected <= SIGNED_IN_FORMS
    assert "/login" not in SIGNED_IN_FORMS
    # the edge compares exact paths: a form with a path parameter would slip past it (the review)
    assert not [path for path in SIGNED_IN_FORMS if "{" in path]
    ended = web_cookie(client, key)
    assert client.post("/logout", headers=ended, follow_redirects=False).status_code == 303
    client.cookies.clear()
    read.clear()
    photo = {"file": ("x.jpg", b"\xff\xd8" + b"\0" * 60_000)}  # under the small forms' limit
    for headers in ({}, ended, {"Cookie": "drscreen_session=made-up"}):
        for path in sorted(SIGNED_IN_FORMS):
            form = {"patient_id": "p-1"}
            resp = client.post(path, headers=headers, data=form, files=photo, follow_redirects=False)
            assert resp.status_code == 303 and resp.headers["location"].startswith("/login"), (path, headers)
    assert read == []
    # signed in, the form is read as before
    live = web_cookie(client, key)
    read.clear()
    photo = {"file": ("x.jpg", sample_bytes("16", "left"))}
    form = {"patient_id": "p-1", "eye": "left"}
    resp = client.post("/screenings/image", headers=live, data=form, files=photo, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/images/"), resp.text
    assert read == ["/screenings/image"]


def test_web_forms_without_photographs_take_a_small_body(client: TestClient, url: str, key: Key) -> None:
    """A sign-in form of 100 MiB was read whole (urlencoded forms are parsed in memory), by anyone:
    forms that carry no photograph are limited to a few fields; the upload forms keep the API's limit."""
    from services.app import FORM_BODY_BYTES

    big = {"api_key": "x" * (FORM_BODY_BYTES + 1)}
    for path in ("/login", "/logout", "/patients", "/jobs"):
        resp = client.post(path, data=big, follow_redirects=False)
        assert resp.status_code == 413 and resp.json()["detail"] == "request body larger than 64 KiB", path
    # the API's small JSON writes too (a grader's grade took 100 MB bodies: the review)
    body = b'{"grade": 2, "grader": "' + b"x" * FORM_BODY_BYTES + b'"}'
    json_type = {"Content-Type": "application/json"}
    for method, path in (("PUT", "/v1/images/" + "0" * 32 + "/grader-grade"), ("POST", "/v1/jobs")):
        resp = client.request(method, path, headers=key.headers | json_type, content=body)
        assert resp.status_code == 413, (path, resp.text)
    refused = client.post("/login", data={"api_key": "drs_made-up", "next": "/"}, follow_redirects=False)
    assert refused.status_code == 401  # an ordinary sign-in form still reaches its route
    cookie = web_cookie(client, key)
    padded = sample_bytes("16", "left") + b"\0" * (2 * FORM_BODY_BYTES)  # JPEG ends at its EOI marker
    resp = client.post("/screenings/image", headers=cookie, data={"patient_id": "p-2", "eye": "left"},
                       files={"file": ("x.jpg", padded)}, follow_redirects=False)  # fmt: skip
    assert resp.status_code == 303, resp.text


def test_api_answers_are_not_kept_by_caches(client: TestClient, key: Key) -> None:
    """The security review: JSON answers with patients' grades carried no Cache-Control."""
    client.post("/v1/images", headers=key.headers, data={"patient_id": "c-1", "eye": "left"},
                files={"file": ("x.jpg", sample_bytes("16", "left"))})  # fmt: skip
    for path in ("/v1/patients/c-1", "/v1/models", "/v1/patients/nobody"):
        assert client.get(path, headers=key.headers).headers["cache-control"] == "no-store", path


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_photographs_are_refused_and_write_nothing(
    client: TestClient, url: str, key: Key, name: str
) -> None:
    resp = _upload(client, key, bad_files()[name])
    assert 400 <= resp.status_code < 500, resp.text
    body = resp.json()
    assert body["error"] in {"invalid_image", "too_large"}
    assert body["detail"]["field"] == "file"
    assert _count(url, Image) == 0 and _count(url, Patient) == 0


def test_bad_fields_are_refused(client: TestClient, url: str, key: Key) -> None:
    good = sample_bytes("19", "left")
    cases: list[Any] = [
        client.post("/v1/images", headers=key.headers, data={"eye": "left"}, files={"file": ("a.jpg", good)}),
        client.post("/v1/images", headers=key.headers, data={"patient_id": "p", "eye": "left"}),
        _upload(client, key, good, eye="middle"),
        _upload(client, key, good, patient_id="../etc"),
        _upload(client, key, good, patient_id=""),
        _upload(client, key, good, colour="blue"),
        client.post("/v1/images", headers=key.headers, json={"patient_id": "p", "eye": "left"}),
        client.post("/v1/bundles", headers=key.headers, data={"patient_id": "p"}),
        client.post(
            "/v1/bundles", headers=key.headers, data={"patient_id": "p"}, files={"left1": ("a.jpg", good)}
        ),
        client.post("/v1/jobs", headers=key.headers, json={}),
        client.post("/v1/jobs", headers=key.headers, json={"folder": "/tmp", "extra": 1}),
        client.post("/v1/jobs", headers=key.headers, content=b"not json", params={}),
        client.get("/v1/jobs/abc/results", headers=key.headers, params={"limit": 0}),
    ]
    for resp in cases:
        assert resp.status_code == 422 or resp.status_code == 404, resp.text
        assert "error" in resp.json() and "detail" in resp.json()
    assert _count(url, Image) == 0 and _count(url, Bundle) == 0 and _count(url, ScoringJob) == 0


def test_one_bad_file_refuses_the_whole_bundle(client: TestClient, url: str, key: Key) -> None:
    files = {
        "left_1": ("l.jpg", sample_bytes("19", "left")),
        "right_1": ("r.jpg", sample_bytes("19", "right")),
        "right_2": ("r2.jpg", bad_files()["truncated_jpeg"]),
    }
    resp = client.post("/v1/bundles", headers=key.headers, data={"patient_id": "p-9"}, files=files)
    assert resp.status_code == 422
    assert resp.json()["detail"]["field"] == "right_2"
    assert _count(url, Image) == 0 and _count(url, Bundle) == 0 and _count(url, Patient) == 0


def test_a_store_that_cannot_be_written_is_a_503_that_leaves_nothing(
    client: TestClient, url: str, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault review: a read-only or full store answered 500 "an unexpected error occurred"
    (the 5xx alert calls that a bug), and a bundle whose later photograph failed left the earlier
    ones in the store, named by no row (no erasure would ever find them)."""
    import errno

    from core.store import FileStore

    store = FileStore(get_settings().store_path)
    put_bytes = FileStore.put_bytes
    fail_after = {"n": 0}

    def full_after_n(self: FileStore, data: bytes, ext: str) -> Any:
        if fail_after["n"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        fail_after["n"] -= 1
        return put_bytes(self, data, ext)

    monkeypatch.setattr(FileStore, "put_bytes", full_after_n)
    resp = _upload(client, key, sample_bytes("19", "left"))
    assert resp.status_code == 503 and resp.json()["error"] == "unavailable", resp.text
    assert "cannot be stored right now" in resp.json()["detail"] and "Retry-After" in resp.headers
    assert str(store.root) not in resp.text  # the path is the operator's (server log)
    fail_after["n"] = 1  # the bundle's first photograph is stored, its second is not
    files = {
        "left_1": ("l.jpg", sample_bytes("19", "left")),
        "right_1": ("r.jpg", sample_bytes("19", "right")),
    }
    resp = client.post("/v1/bundles", headers=key.headers, data={"patient_id": "p-9"}, files=files)
    assert resp.status_code == 503, resp.text
    assert _count(url, Image) == 0 and _count(url, Bundle) == 0 and _count(url, Patient) == 0
    assert [p for p in store.root.rglob("*") if p.is_file()] == []  # the first one removed again


def test_readiness_says_when_the_store_cannot_take_uploads(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault review: /readyz answered "ready" with a read-only or full store."""
    from collections import namedtuple

    assert client.get("/readyz").json()["checks"]["store"] is True
    full = namedtuple("full", "f_bavail f_frsize")(f_bavail=10, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["store"] is False
    assert ready.json()["detail"] == "not ready: store"


def test_one_photograph_as_both_eyes_refuses_the_bundle(client: TestClient, url: str, key: Key) -> None:
    """The walkthrough: the same file as left_1 and right_1 was accepted, and the patient came back
    "no referral" with one eye never photographed."""
    photo = sample_bytes("19", "left")
    files = {"left_1": ("l.jpg", photo), "right_1": ("r.jpg", photo)}
    resp = client.post("/v1/bundles", headers=key.headers, data={"patient_id": "p-9"}, files=files)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"] == "invalid_input" and "left and the right eye" in body["detail"]["message"]
    assert _count(url, Image) == 0 and _count(url, Bundle) == 0 and _count(url, Patient) == 0
    # the same file twice for one eye is one photograph of it (counted once), not refused
    same_eye = {"left_1": ("l.jpg", photo), "left_2": ("l2.jpg", photo)}
    assert (
        client.post(
            "/v1/bundles", headers=key.headers, data={"patient_id": "p-9"}, files=same_eye
        ).status_code
        == 202
    )


def test_a_bundles_photographs_are_recorded_under_their_eyes(client: TestClient, url: str, key: Key) -> None:
    """The session-31 mutation review: no test said which eye a bundle's ``left_*`` and
    ``right_*`` photographs were recorded under. Swapped, a clinic would read each eye's grade
    on the other eye (a referable left eye treated, or followed up, as the right one)."""
    files = {
        "left_1": ("l.jpg", sample_bytes("19", "left")),
        "right_2": ("r.jpg", sample_bytes("19", "right")),
    }
    resp = client.post("/v1/bundles", headers=key.headers, data={"patient_id": "p-eyes"}, files=files)
    assert resp.status_code == 202, resp.text
    bundle_id = resp.json()["id"]
    with session_scope(url) as s:
        of_bundle = select(Image.id, Image.filename, Image.eye).where(Image.bundle_id == bundle_id)
        rows = s.execute(of_bundle).all()
    assert {filename: eye for _, filename, eye in rows} == {"l.jpg": "left", "r.jpg": "right"}
    left, right = (next(i for i, filename, _ in rows if filename == name) for name in ("l.jpg", "r.jpg"))
    got = client.get(f"/v1/bundles/{bundle_id}", headers=key.headers)
    assert got.status_code == 200, got.text
    body = got.json()
    assert {im["id"]: im["eye"] for im in body["images"]} == {left: "left", right: "right"}
    eyes = body["patient"]["eyes"]
    assert (eyes["left"]["image_ids"], eyes["right"]["image_ids"]) == ([left], [right])


def test_upload_limits(url: str, key: Key, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_MAX_UPLOAD_MB", "1")
    monkeypatch.setenv("DRSCREEN_MAX_IMAGE_PIXELS", "100000")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        big = os.urandom(1024 * 1024 + 10)
        resp = _upload(client, key, big)
        assert resp.status_code == 413 and resp.json()["error"] == "too_large"
        # Over the whole-request limit (4 files + slack): refused from Content-Length, before parsing.
        resp = _upload(client, key, os.urandom(6 * 1024 * 1024))
        assert resp.status_code == 413
        # A "decompression bomb": small file, too many pixels.
        resp = _upload(client, key, png_bytes(1000, 1000))
        assert resp.status_code == 413 and resp.json()["detail"]["reason"] == "too_large"
    assert _count(url, Image) == 0


def test_streamed_body_over_the_limit_is_refused(url: str, key: Key, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_MAX_UPLOAD_MB", "1")
    get_settings.cache_clear()

    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"x" * (1024 * 1024)

    with TestClient(create_app()) as client:
        resp = client.post(
            "/v1/images",
            headers=key.headers | {"Content-Type": "multipart/form-data; boundary=zz"},
            content=chunks(),
        )
    assert resp.status_code == 413


def test_upload_is_accepted_stored_and_queued(client: TestClient, url: str, key: Key) -> None:
    data = sample_bytes("16", "left")
    resp = _upload(client, key, data, patient_id="16")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued"
    got = client.get(f"/v1/images/{body['id']}", headers=key.headers).json()
    assert got["status"] == "queued" and got["patient_id"] == "16" and got["eye"] == "left"
    assert client.get(f"/v1/images/{body['id']}/explanation", headers=key.headers).status_code == 409
    queue = get_settings().broker_dir / "queue"
    assert any(p.name.endswith(".uploads.msg") for p in queue.iterdir())  # not behind folder jobs
    # Same bytes again: a second image row, one stored file (content addressed).
    assert _upload(client, key, data, patient_id="16").status_code == 202
    stored = [p for p in get_settings().store_path.rglob("*.jpg")]
    assert len(stored) == 1 and _count(url, Image) == 2


def test_idempotency_key(client: TestClient, url: str, key: Key) -> None:
    data = sample_bytes("19", "right")
    headers = key.headers | {"Idempotency-Key": "visit-42"}
    files = {"file": ("r.jpg", data)}
    first = client.post("/v1/images", headers=headers, data={"patient_id": "19", "eye": "right"}, files=files)
    again = client.post("/v1/images", headers=headers, data={"patient_id": "19", "eye": "right"}, files=files)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/images", headers=headers, data={"patient_id": "19", "eye": "left"}, files=files)
    assert other.status_code == 409
    assert _count(url, Image) == 1

    bundle_headers = key.headers | {"Idempotency-Key": "visit-43"}
    bundle_files = {"left_1": ("l.jpg", sample_bytes("19", "left")), "right_1": ("r.jpg", data)}
    ids = {
        client.post(
            "/v1/bundles", headers=bundle_headers, data={"patient_id": "19"}, files=bundle_files
        ).json()["id"]
        for _ in range(2)
    }
    assert len(ids) == 1 and _count(url, Bundle) == 1 and _count(url, Image) == 3


def test_uploads_are_audited_and_their_keys_remembered(client: TestClient, url: str, key: Key) -> None:
    image = client.post(
        "/v1/images",
        headers=key.headers | {"Idempotency-Key": "img-1"},
        data={"patient_id": "19", "eye": "right"},
        files={"file": ("r.jpg", sample_bytes("19", "right"))},
    ).json()["id"]
    bundle = client.post(
        "/v1/bundles",
        headers=key.headers,  # no key: nothing to remember
        data={"patient_id": "19"},
        files={"left_1": ("l.jpg", sample_bytes("19", "left"))},
    ).json()["id"]
    with session_scope(url) as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        events = [(r.action, r.target_type, r.detail) for r in rows if r.action.endswith(".create")]
        [bundle_image] = s.scalars(select(Image.id).where(Image.bundle_id == bundle)).all()
        assert all(r.clinic_id == key.clinic_id and r.api_key_id == key.key_id for r in rows)
        assert not [r for r in rows if r.action == "idempotency_key"]  # keys have a table of their own
        remembered = [(r.clinic_id, r.kind, r.resource_id) for r in s.scalars(select(IdempotencyKey))]
    assert events == [
        ("image.create", "image", None),
        ("bundle.create", "bundle", {"images": [bundle_image]}),
    ]
    assert remembered == [(key.clinic_id, "image", image)]
    queue = get_settings().broker_dir / "queue"
    assert len([p for p in queue.iterdir() if p.name.endswith(".uploads.msg")]) == 2


def test_web_progress_answers(client: TestClient, key: Key) -> None:
    bundle = client.post(
        "/v1/bundles",
        headers=key.headers,
        data={"patient_id": "19"},
        files={
            "left_1": ("l.jpg", sample_bytes("19", "left")),
            "right_1": ("r.jpg", sample_bytes("19", "right")),
        },
    ).json()["id"]
    image = _upload(client, key, sample_bytes("16", "left")).json()["id"]
    cookie = web_cookie(client, key)
    pending = {"finished": 0, "failed": 0, "heatmaps_missing": 0, "scored": False, "complete": False}
    for path, total in ((f"/bundles/{bundle}/progress", 2), (f"/images/{image}/progress", 1)):
        resp = client.get(path, headers=cookie)
        assert resp.status_code == 200 and resp.json() == {"total": total, **pending}, path
        assert resp.headers["cache-control"] == "no-store"
        signed_out = client.get(path)
        assert signed_out.status_code == 401 and signed_out.json() == {"error": "unauthorized"}
    for path in ("/bundles/nope/progress", f"/bundles/{image}/progress", f"/images/{bundle}/progress"):
        resp = client.get(path, headers=cookie)
        assert resp.status_code == 404 and resp.json() == {"error": "not_found"}, path


def test_folder_jobs_stay_inside_the_import_roots(
    url: str, key: Key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "imports"
    (root / "visit").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    monkeypatch.setenv("DRSCREEN_IMPORT_ROOTS", str(root))
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        refused = {
            str(outside): 403,
            f"{root}/visit/../../private": 403,
            str(root / "escape"): 403,
            "/etc": 403,
            "relative/path": 422,
            str(root / "missing"): 422,
            "~0": 422,  # the fuzzer's: the home of an unknown user was a 500
            "~no-such-user-here/visit": 422,
            str(root / "loop"): 422,  # a symbolic link loop
        }
        for folder, status in refused.items():
            resp = client.post("/v1/jobs", headers=key.headers, json={"folder": folder})
            assert resp.status_code == status, (folder, resp.text)
        assert _count(url, ScoringJob) == 0
        resp = client.post("/v1/jobs", headers=key.headers, json={"folder": str(root / "visit")})
        assert resp.status_code == 202
        job = client.get(f"/v1/jobs/{resp.json()['id']}", headers=key.headers).json()
        assert job["status"] == "queued" and job["folder"] == str((root / "visit").resolve())


def test_per_clinic_import_folders_keep_clinics_apart(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DRSCREEN_IMPORT_PER_CLINIC a clinic reads only <root>/<its name>/ (the audit: clinic B
    could import clinic A's exported folder and see A's photographs as its own)."""
    root = tmp_path / "imports"
    for clinic in ("North", "South"):
        (root / clinic / "visit").mkdir(parents=True)
    north, south = make_key(url, "North"), make_key(url, "South")
    monkeypatch.setenv("DRSCREEN_IMPORT_ROOTS", str(root))
    monkeypatch.setenv("DRSCREEN_IMPORT_PER_CLINIC", "true")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as client:
            for key, folder, status in (
                (north, root / "North" / "visit", 202),
                (south, root / "South" / "visit", 202),
                (south, root / "North" / "visit", 403),
                (north, root / "South", 403),
                (north, root, 403),
            ):
                resp = client.post("/v1/jobs", headers=key.headers, json={"folder": str(folder)})
                assert resp.status_code == status, (folder, resp.text)
            # a clinic whose name is no folder name is told so (not "no import roots configured")
            slashed = make_key(url, "Eye unit / St Mary")
            resp = client.post("/v1/jobs", headers=slashed.headers, json={"folder": str(root)})
            assert resp.status_code == 403 and "cannot be a folder name" in resp.text
    finally:
        get_settings.cache_clear()


def test_import_roots_for_a_clinic(tmp_path: Path) -> None:
    shared = Settings(import_roots=f"{tmp_path}/a:{tmp_path}/b")
    assert shared.import_roots_for("North") == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    own = Settings(import_roots=f"{tmp_path}/a", import_per_clinic=True)
    assert own.import_roots_for("North") == [(tmp_path / "a" / "North").resolve()]
    for unsafe in ("", ".", "..", "a/b", "a\\b", "x\x00"):
        assert own.import_roots_for(unsafe) == []


def test_no_import_roots_means_no_folder_jobs(client: TestClient, key: Key, tmp_path: Path) -> None:
    resp = client.post("/v1/jobs", headers=key.headers, json={"folder": str(tmp_path)})
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"


def test_rate_limit_per_key(url: str, key: Key, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRSCREEN_RATE_LIMIT_PER_MINUTE", "6")
    monkeypatch.setenv("DRSCREEN_RATE_LIMIT_BURST", "3")
    get_api_settings.cache_clear()
    other = make_key(url, "South clinic")
    try:
        with TestClient(create_app()) as client:
            codes = [client.get("/v1/patients/x", headers=key.headers).status_code for _ in range(4)]
            assert codes == [404, 404, 404, 429]
            limited = client.get("/v1/patients/x", headers=key.headers)
            assert limited.json()["error"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
            # the body says what the header says (it said 0.0 while the header said 1)
            assert limited.json()["detail"]["retry_after_seconds"] == int(limited.headers["retry-after"])
            assert client.get("/v1/patients/x", headers=other.headers).status_code == 404
    finally:
        get_api_settings.cache_clear()


def _fake_release(models_dir: Path) -> None:
    folder = models_dir / "ensembles" / "drscreen-test" / "0.2.0"
    folder.mkdir(parents=True)
    manifest = {
        "name": "drscreen-test",
        "version": "0.2.0",
        "members": [{"ref": "m-a@0.1.0"}, {"ref": "m-b@0.1.0"}],
        "combination": {"rule": "weighted_average"},
        "card": {
            # as in 1.6.0: the card's equal average runs as a weighted average of equal weights
            "chosen_rule": "equal_average",
            "metrics": {"m-a@0.1.0": {"test": {"qwk": 0.5}}, "rule:equal_average": {"test": {"qwk": 0.6}}},
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_models_readiness_and_metrics(
    url: str, key: Key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRSCREEN_MODELS_DIR", str(tmp_path / "models"))
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        checks = {"database": True, "schema": True, "broker": True, "model": False, "store": True}
        assert ready.json()["checks"] == checks
        assert client.get("/v1/models", headers=key.headers).status_code == 503
        _fake_release(tmp_path / "models")
        assert client.get("/readyz").status_code == 200
        info = client.get("/v1/models", headers=key.headers).json()
        assert info["version"] == "drscreen-test@0.2.0"
        assert [m["ref"] for m in info["members"]] == ["m-a@0.1.0", "m-b@0.1.0"]
        assert info["members"][0]["metrics"]["test"]["qwk"] == 0.5
        assert info["metrics"]["test"]["qwk"] == 0.6
        assert info["metrics"]["combination"] == "equal_average"  # the card's name, not the runtime's
        _upload(client, key, sample_bytes("19", "left"))
        text = client.get("/metrics").text
    assert 'drscreen_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "drscreen_http_request_duration_seconds_bucket" in text
    assert 'drscreen_queue_depth{queue="uploads"} 1.0' in text
    assert 'drscreen_images{status="queued"} 1.0' in text
    assert 'drscreen_predictions_by_grade{grade="ungradable"}' in text
    assert 'drscreen_model_info{version="drscreen-test@0.2.0"} 1.0' in text
    assert "drscreen_images_scored" in text
    # the photograph just queued: waiting for seconds, not hours, and not 0 (none waiting)
    oldest = next(line for line in text.splitlines() if line.startswith("drscreen_oldest_queued_seconds "))
    assert 0 < float(oldest.split()[1]) < 600


def test_access_log_hides_patient_ids() -> None:
    import logging

    from services.logfilter import RedactPatientIds

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/patients/JOHN-DOE-1931?x=1", "1.1", 200), None,
    )  # fmt: skip
    assert RedactPatientIds().filter(record)
    assert "JOHN-DOE" not in record.getMessage() and "/v1/patients/<redacted>?x=1" in record.getMessage()


def test_an_ungradable_photograph_has_no_explanation(client: TestClient, url: str, key: Key) -> None:
    """No heatmap is ever drawn for an ungradable photograph: no URL, and its endpoint answers
    404 (not 409 "retry shortly" forever)."""
    from core import repository as repo

    resp = _upload(client, key, png_bytes(), patient_id="ug-1")
    assert resp.status_code == 202, resp.text
    image_id = resp.json()["id"]
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None
        repo.mark_image_done(s, row, quality={"gradable": False, "reasons": ["not_fundus"]}, gradable=False)
    got = client.get(f"/v1/images/{image_id}", headers=key.headers).json()
    assert got["status"] == "done" and got["gradable"] is False and got["explanation_url"] is None
    answer = client.get(f"/v1/images/{image_id}/explanation", headers=key.headers)
    assert answer.status_code == 404 and "ungradable" in answer.json()["detail"]


def test_an_ungradable_photograph_reads_referable_whatever_its_stored_prediction_says(
    client: TestClient, url: str, key: Key
) -> None:
    """The session-31 mutation review: ``GET /v1/images`` reports an ungradable photograph
    referable by the contract's rule, not by its prediction row; no test had a row that said
    otherwise. Taken from the row, a clinic would be told "no referral", with no grade, for a
    photograph nobody could grade."""
    from core import repository as repo

    resp = _upload(client, key, png_bytes(), patient_id="ug-2")
    assert resp.status_code == 202, resp.text
    image_id = resp.json()["id"]
    with session_scope(url) as s:
        mv = repo.get_or_create_model_version(s, "stub-ensemble@0.0.1")
        repo.upsert_prediction(
            s, image_id=image_id, model_version_id=mv.id, grade=None,
            probabilities=[0.8, 0.05, 0.05, 0.05, 0.05], members=None, referable=False, gradable=False,
        )  # fmt: skip
        row = repo.get_image(s, image_id)
        assert row is not None
        repo.mark_image_done(s, row, quality={"gradable": False, "reasons": ["not_fundus"]}, gradable=False)
    got = client.get(f"/v1/images/{image_id}", headers=key.headers)
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["status"], body["gradable"], body["grade"]) == ("done", False, None)
    assert body["referable"] is True


def test_waiting_requests_hand_their_database_connection_back_while_they_sleep(
    client: TestClient, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?wait`` polls the row; between polls the request holds no pooled connection (45 waiting
    requests holding one each exhausted the pool: a 500 after the photograph was saved)."""
    import services.routes.images as images_route
    from core.db import get_engine

    held: list[int] = []
    real_sleep = images_route.time.sleep

    def sleep(seconds: float) -> None:
        held.append(get_engine().pool.checkedout())  # type: ignore[attr-defined]
        real_sleep(seconds)

    monkeypatch.setattr(images_route.time, "sleep", sleep)
    resp = client.post(
        "/v1/images?wait=0.6",
        headers=key.headers,
        data={"patient_id": "w-1", "eye": "left"},
        files={"file": ("x.jpg", sample_bytes("16", "left"))},
    )
    assert resp.status_code == 202 and resp.json()["status"] == "queued"  # no worker runs here
    assert held and set(held) == {0}


def test_a_wait_that_times_out_answers_the_status_it_last_read(
    client: TestClient, key: Key, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 28's leftover: a timed-out ``?wait`` answered the status of before the wait
    ("queued") while a worker had the photograph in hand."""
    import services.routes.images as images_route

    real_sleep = images_route.time.sleep

    def sleep(seconds: float) -> None:  # a worker claims the photograph while the request waits
        with session_scope(url) as s:
            for image in s.scalars(select(Image)):
                image.status = "running"
        real_sleep(seconds)

    monkeypatch.setattr(images_route.time, "sleep", sleep)
    resp = client.post(
        "/v1/images?wait=0.3",
        headers=key.headers,
        data={"patient_id": "w-4", "eye": "left"},
        files={"file": ("x.jpg", sample_bytes("16", "left"))},
    )
    assert resp.status_code == 202 and resp.json()["status"] == "running"
    image_id = resp.json()["id"]
    assert client.get(f"/v1/images/{image_id}", headers=key.headers).json()["status"] == "running"


def test_a_wait_over_30_seconds_is_refused_as_the_contract_bounds_it(
    client: TestClient, url: str, key: Key
) -> None:
    """The session-31 mutation review: the contract bounds ``wait`` at 30 seconds, and no test
    sent more. Let through, a clinic's software asking for minutes would be cut to 30 s without
    a word (a 202 "queued" where it expected the result), and the published schema would promise
    waits the server never gives."""
    resp = client.post(
        "/v1/images?wait=31",
        headers=key.headers,
        data={"patient_id": "w-5", "eye": "left"},
        files={"file": ("x.jpg", sample_bytes("16", "left"))},
    )
    assert resp.status_code == 422, resp.text
    assert "wait" in resp.text
    assert _count(url, Image) == 0
    spec = client.get("/openapi.json").json()
    [wait] = [p for p in spec["paths"]["/v1/images"]["post"]["parameters"] if p["name"] == "wait"]
    schema = wait["schema"]
    bound = next(s for s in schema.get("anyOf", [schema]) if s.get("type") == "number")
    assert (bound["minimum"], bound["maximum"]) == (0, 30)


def test_waiting_requests_are_capped_per_key_and_in_all() -> None:
    from services.waits import WaitSlots

    slots = WaitSlots(total=3, per_key=2)
    with slots.slot(1) as a, slots.slot(1) as b, slots.slot(1) as c:
        assert (a, b, c) == (True, True, False)  # the key's share is 2
        with slots.slot(2) as d, slots.slot(3) as e:
            assert (d, e) == (True, False)  # 3 in all
    with slots.slot(1) as a, slots.slot(1) as b:
        assert a and b  # released on the way out


def test_a_wait_with_every_slot_taken_answers_at_once(
    client: TestClient, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: 45 uploads of one clinic with ``wait=30`` held every route thread and
    another clinic's request took 26 s. Past the per-key share the upload answers 202 without
    sleeping; the client polls."""
    import services.routes.images as images_route

    waited: list[str] = []
    real_wait = images_route._wait_until_finished

    def spy(session: Any, image_id: str, seconds: float, poll: float) -> Any:
        waited.append(image_id)
        return real_wait(session, image_id, 0.0, poll)

    monkeypatch.setattr(images_route, "_wait_until_finished", spy)

    def upload(patient: str) -> Any:
        return client.post(
            "/v1/images?wait=5",
            headers=key.headers,
            data={"patient_id": patient, "eye": "left"},
            files={"file": ("x.jpg", sample_bytes("16", "left"))},
        )

    assert upload("w-2").status_code == 202 and len(waited) == 1  # a slot was free: it waited
    slots = client.app.state.wait_slots  # type: ignore[attr-defined]
    with contextlib.ExitStack() as held:
        for _ in range(8):  # the key's share (DRSCREEN_MAX_WAITING_PER_KEY)
            assert held.enter_context(slots.slot(key.key_id))
        resp = upload("w-3")
    assert resp.status_code == 202 and resp.json()["status"] == "queued"
    assert len(waited) == 1  # the key's 8 slots were taken: no wait


def test_a_database_that_stops_answering_is_a_503_not_a_500(
    client: TestClient, key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import exc as sa_exc

    import services.routes.patients as patients_route

    def down(*_args: Any, **_kwargs: Any) -> Any:
        raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(patients_route.repo, "get_patient", down)
    resp = client.get("/v1/patients/p-1", headers=key.headers)
    assert resp.status_code == 503 and resp.json()["error"] == "unavailable"
    assert resp.headers["Retry-After"] == "5"


def test_a_database_down_at_the_edge_is_one_503_before_the_body(
    client: TestClient, key: Key, monkeypatch: pytest.MonkeyPatch, form_reads: list[str]
) -> None:
    """Session 24's leftover: with the database down, a write waited for it twice (the edge's key
    lookup, then the route's) before its 503; now the edge answers the 503 itself, unread."""
    from sqlalchemy import exc as sa_exc

    from core import repository

    cookie = web_cookie(client, key)
    form_reads.clear()
    asked: list[str] = []

    def down(*_args: Any, **_kwargs: Any) -> Any:
        asked.append("db")
        raise sa_exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(repository, "authenticate_api_key", down)
    monkeypatch.setattr(repository, "web_session_key", down)
    form = {"patient_id": "p-1", "eye": "left"}
    photo = {"file": ("x.jpg", sample_bytes("16", "left"))}
    for path, headers in (("/v1/images", key.headers), ("/screenings/image", cookie)):
        asked.clear()
        resp = client.post(path, headers=headers, data=form, files=photo, follow_redirects=False)
        assert resp.status_code == 503 and resp.json()["error"] == "unavailable", path
        assert resp.headers["Retry-After"] == "5"
        assert asked == ["db"], path  # asked once, not again by the route
    assert form_reads == []


def test_a_field_given_twice_is_refused_not_half_kept(client: TestClient, url: str, key: Key) -> None:
    """Two photographs under one field name: one of them would silently never be screened."""
    left, right = sample_bytes("16", "left"), sample_bytes("16", "right")
    resp = client.post(
        "/v1/images",
        headers=key.headers,
        data={"patient_id": "dup-1", "eye": "left"},
        files=[("file", ("a.jpg", left)), ("file", ("b.jpg", right))],
    )
    assert resp.status_code == 422 and "more than once" in resp.json()["detail"]["message"]
    resp = client.post(
        "/v1/bundles",
        headers=key.headers,
        data={"patient_id": "dup-1"},
        files=[("left_1", ("a.jpg", left)), ("left_1", ("b.jpg", right))],
    )
    assert resp.status_code == 422, resp.text
    assert _count(url, Image) == 0 and _count(url, Bundle) == 0


def test_swagger_and_redoc_are_off_unless_asked_for(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The security review: /docs and /redoc load scripts from a CDN onto the staff pages' origin."""
    from services.app import create_app
    from services.config import get_api_settings

    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200
    monkeypatch.setenv("DRSCREEN_API_DOCS", "true")
    get_api_settings.cache_clear()
    with TestClient(create_app()) as dev:
        assert dev.get("/docs").status_code == 200 and dev.get("/redoc").status_code == 200
    get_api_settings.cache_clear()


def test_openapi_documents_the_errors_the_api_gives(client: TestClient, key: Key) -> None:
    """Integrators read the contract from /openapi.json: error answers are ErrorBody (never
    FastAPI's HTTPValidationError, which this API does not send), a path-id route cannot answer
    422, every /v1 route can answer 503, uploads 400; /readyz has its schema."""
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            for status, answer in responses.items():
                if status.startswith(("4", "5")) and "content" in answer and path.startswith("/v1"):
                    assert answer["content"]["application/json"]["schema"] == error_ref, (path, status)
            if path.startswith("/v1/"):
                assert "503" in responses, (method, path)
            if path.startswith("/v1/") and method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                assert "413" in responses, (method, path)  # every write has a body limit (the review)
    assert "413" in spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert "422" not in spec["paths"]["/v1/images/{image_id}"]["get"]["responses"]
    assert "422" in spec["paths"]["/v1/images"]["post"]["responses"]
    assert "400" in spec["paths"]["/v1/bundles"]["post"]["responses"]
    ready = spec["paths"]["/readyz"]["get"]["responses"]
    assert ready["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    image = spec["components"]["schemas"]["ImageResult"]["properties"]
    probs = next(s for s in image["probabilities"]["anyOf"] if s.get("type") == "array")
    assert probs["minItems"] == probs["maxItems"] == 5

    # timestamps carry their UTC offset, on SQLite too
    body = _upload(client, key, sample_bytes("16", "left"), patient_id="ts-1").json()
    created = client.get(f"/v1/images/{body['id']}", headers=key.headers).json()["created_at"]
    assert created.endswith(("Z", "+00:00")), created


def test_a_job_explain_flag_must_be_a_boolean(client: TestClient, key: Key) -> None:
    resp = client.post("/v1/jobs", headers=key.headers, json={"folder": "/nowhere", "explain": "yes"})
    assert resp.status_code == 422


def test_plain_routes_are_counted_under_their_path(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/no/such/page").status_code == 404
    text = client.get("/metrics").text
    assert 'route="/openapi.json",status="200"' in text
    assert 'route="unmatched",status="404"' in text


def test_metrics_answer_only_their_token_when_one_is_set(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``DRSCREEN_METRICS_TOKEN``: /metrics counts every clinic's work; a deployment without a proxy
    in front can keep it to its Prometheus (session 26's leftover)."""
    monkeypatch.setenv("DRSCREEN_METRICS_TOKEN", "s3cret-token")
    get_api_settings.cache_clear()
    try:
        with TestClient(create_app()) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
                refused = c.get("/metrics", headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                assert refused.json()["error"] == "unauthorized"
            allowed = c.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
            assert allowed.status_code == 200 and "drscreen_" in allowed.text
    finally:
        get_api_settings.cache_clear()
