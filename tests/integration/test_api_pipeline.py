"""The API against real PostgreSQL, Redis and a real worker process (no eager mode): bundles end to
end, ``wait``, patient history, heatmaps, folder jobs (JSON and CSV), clinic isolation, audit, and
bad input leaving no rows."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select

from core.db import session_scope
from core.settings import get_settings
from core.tables import AuditEvent, Bundle, Image, ScoringJob
from services.app import create_app
from tests.api_support import SAMPLES, Key, bad_files, make_key, model_env, revoke, sample, wait_for
from tests.conftest import WorkerProcess

pytestmark = pytest.mark.slow

SCORING_TIMEOUT = 240.0


@pytest.fixture
def env(pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # A Redis database of its own, so a worker of another test module never takes these messages.
    broker = redis_url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(broker).flushdb()
    values = {
        "DRSCREEN_DATABASE_URL": pg_url,
        "DRSCREEN_BROKER_URL": broker,
        "DRSCREEN_STORE_DIR": str(tmp_path / "store"),
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
        "DRSCREEN_IMPORT_ROOTS": str(SAMPLES),
        **model_env(),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return values


@pytest.fixture
def client(env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app()) as c:
        yield c


def _bundle_files(patient: str) -> dict[str, tuple[str, bytes, str]]:
    return {
        f"{eye}_1": (f"{patient}_{eye}.jpg", sample(patient, eye).read_bytes(), "image/jpeg")
        for eye in ("left", "right")
    }


def _get(client: TestClient, key: Key, path: str, **params: Any) -> Any:
    resp = client.get(path, headers=key.headers, params=params)
    assert resp.status_code == 200, (path, resp.status_code, resp.text)
    return resp.json()


def _screen_bundle(client: TestClient, key: Key, patient: str) -> dict[str, Any]:
    resp = client.post(
        "/v1/bundles", headers=key.headers, data={"patient_id": patient}, files=_bundle_files(patient)
    )
    assert resp.status_code == 202, resp.text
    bundle_id = resp.json()["id"]
    return wait_for(
        lambda: _get(client, key, f"/v1/bundles/{bundle_id}"),
        lambda b: b["status"] in ("done", "failed") and b["patient"]["updated_at"] is not None,
        SCORING_TIMEOUT,
        f"bundle {bundle_id} done",
    )


def _assert_scored(image: dict[str, Any]) -> None:
    assert image["status"] == "done", image
    assert image["model_version"] == model_env()["DRSCREEN_MODEL"]
    assert len(image["probabilities"]) == 5 and abs(sum(image["probabilities"]) - 1) < 1e-3
    assert isinstance(image["gradable"], bool) and isinstance(image["referable"], bool)
    assert image["quality"] and "gradable" in image["quality"]
    assert image["members"] and all(len(p) == 5 for p in image["members"].values())
    if image["gradable"]:
        assert image["grade"] in range(5) and image["referable"] == (image["grade"] >= 2)
    else:
        assert image["grade"] is None and image["referable"] is True
    assert image["explanation_url"] == f"/v1/images/{image['id']}/explanation"


def test_screening_through_the_api(
    client: TestClient, env: dict[str, str], start_worker: Callable[..., WorkerProcess]
) -> None:
    url = env["DRSCREEN_DATABASE_URL"]
    worker = start_worker(env=env | {"OMP_NUM_THREADS": "1"})
    # clinics of their own: the session's database is shared with other tests that screen the samples
    tag = uuid.uuid4().hex[:8]
    north, south = make_key(url, f"North-{tag}"), make_key(url, f"South-{tag}")

    # A bundle, end to end: both eyes scored, the patient aggregated.
    first = _screen_bundle(client, north, "16")
    assert first["status"] == "done", worker.output()[-3000:]
    assert sorted(im["eye"] for im in first["images"]) == ["left", "right"]
    for image in first["images"]:
        _assert_scored(image)
    patient = first["patient"]
    assert patient["patient_id"] == "16" and patient["model_version"] == model_env()["DRSCREEN_MODEL"]
    assert set(patient["eyes"]) == {"left", "right"}
    graded_eyes = [e["grade"] for e in patient["eyes"].values() if e["grade"] is not None]
    assert patient["grade"] == (max(graded_eyes) if graded_eyes else None)

    # The heatmap: a PNG with the photograph's size.
    left = next(im for im in first["images"] if im["eye"] == "left")
    png = wait_for(
        lambda: client.get(left["explanation_url"], headers=north.headers),
        lambda r: r.status_code != 409,
        SCORING_TIMEOUT,
        "explanation",
    )
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    # a patient's picture: no shared cache keeps it, no browser sniffs it as something else
    assert png.headers["cache-control"] == "private, no-store"
    assert png.headers["x-content-type-options"] == "nosniff"
    with PILImage.open(io.BytesIO(png.content)) as heat:
        heat.load()
        with PILImage.open(sample("16", "left")) as photo:
            assert heat.size == photo.size and heat.format == "PNG"

    # One photograph with `wait`: answered 200 with the result.
    resp = client.post(
        "/v1/images",
        headers=north.headers,
        params={"wait": 30},
        data={"patient_id": "19", "eye": "right"},
        files={"file": ("19_right.jpg", sample("19", "right").read_bytes(), "image/jpeg")},
    )
    assert resp.status_code == 200, resp.text
    single = resp.json()
    _assert_scored(single)
    assert single["patient_id"] == "19" and single["eye"] == "right"

    # The same patient screened again: the history keeps both screenings, newest first.
    second = _screen_bundle(client, north, "16")
    assert second["status"] == "done"
    history = _get(client, north, "/v1/patients/16")["history"]
    assert len(history) == 2, history
    assert history[0]["computed_at"] >= history[1]["computed_at"]
    assert len(_get(client, north, "/v1/patients/19")["history"]) == 1

    # A folder job (one sample patient's folder) with its results as JSON and CSV.
    resp = client.post("/v1/jobs", headers=north.headers, json={"folder": str(SAMPLES / "229")})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    job = wait_for(
        lambda: _get(client, north, f"/v1/jobs/{job_id}"),
        lambda j: j["status"] in ("done", "failed"),
        SCORING_TIMEOUT,
        "job done",
    )
    assert job["status"] == "done" and job["total"] == 2 and job["done"] == 2 and job["failed"] == 0
    assert sum(job["grades"].values()) == 2
    page = _get(client, north, f"/v1/jobs/{job_id}/results", limit=1)
    assert page["total"] == 2 and len(page["items"]) == 1 and page["next_offset"] == 1
    rows = _get(client, north, f"/v1/jobs/{job_id}/results", offset=1)["items"] + page["items"]
    assert {(r["patient_id"], r["eye"]) for r in rows} == {("229", "left"), ("229", "right")}
    csv_resp = client.get(f"/v1/jobs/{job_id}/results", headers=north.headers, params={"format": "csv"})
    assert csv_resp.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(csv_resp.text)))
    assert len(table) == 2 and all(
        r["status"] == "done" and r["model_version"] == model_env()["DRSCREEN_MODEL"] for r in table
    )
    # booleans as the CLI's CSV writes them
    assert all(r["referable"] in ("true", "false") and r["gradable"] == "true" for r in table)
    assert all(r["quality_reasons"] == "" for r in table)  # the column is there; gradable: no reason

    # Another clinic sees none of it: every id answers 404.
    foreign = [
        f"/v1/images/{left['id']}",
        f"/v1/images/{left['id']}/explanation",
        f"/v1/images/{single['id']}",
        f"/v1/bundles/{first['id']}",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/results",
        "/v1/patients/16",
        "/v1/patients/229",
    ]
    for path in foreign:
        resp = client.get(path, headers=south.headers)
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", (path, resp.text)
    # ... and a revoked key nothing at all.
    revoke(url, north)
    assert client.get("/v1/patients/16", headers=north.headers).status_code == 401

    # Reads and writes of patient data were audited (ids only, never the key).
    with session_scope(url) as s:
        actions = set(s.scalars(select(AuditEvent.action).where(AuditEvent.clinic_id == north.clinic_id)))
    assert {"bundle.create", "bundle.read", "image.create", "patient.read", "job.create"} <= actions
    assert {"explanation.read", "job.results.read"} <= actions

    metrics = client.get("/metrics").text
    assert 'drscreen_images{status="done"}' in metrics and "drscreen_queue_depth" in metrics


def test_bad_input_leaves_no_rows_on_postgres(client: TestClient, env: dict[str, str]) -> None:
    url = env["DRSCREEN_DATABASE_URL"]
    key = make_key(url, "East")
    with session_scope(url) as s:
        before = [s.scalar(select(func.count()).select_from(t)) for t in (Image, Bundle, ScoringJob)]
    good = sample("19", "left").read_bytes()
    for name, data in bad_files().items():
        resp = client.post(
            "/v1/images",
            headers=key.headers,
            data={"patient_id": "e1", "eye": "left"},
            files={"file": ("x", data)},
        )
        assert 400 <= resp.status_code < 500, (name, resp.text)
        resp = client.post(
            "/v1/bundles",
            headers=key.headers,
            data={"patient_id": "e1"},
            files={"left_1": ("l.jpg", good), "right_1": ("r.jpg", data)},
        )
        assert 400 <= resp.status_code < 500, (name, resp.text)
    assert client.post("/v1/images", headers=key.headers, data={"patient_id": "e1", "eye": "up"},
                       files={"file": ("x.jpg", good)}).status_code == 422  # fmt: skip
    assert client.post("/v1/jobs", headers=key.headers, json={"folder": "/etc"}).status_code == 403
    assert (
        client.post("/v1/jobs", headers=key.headers, json={"folder": f"{SAMPLES}/../core"}).status_code == 403
    )
    with session_scope(url) as s:
        after = [s.scalar(select(func.count()).select_from(t)) for t in (Image, Bundle, ScoringJob)]
        assert s.scalar(select(func.count()).select_from(Image).where(Image.clinic_id == key.clinic_id)) == 0
    assert before == after
