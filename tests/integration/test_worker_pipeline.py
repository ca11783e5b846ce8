"""The workers for real: rows in PostgreSQL, messages through Redis, a `drscreen worker` subprocess
with the dev ensemble (drscreen-dev@0.1.0: a small MobileNetV2 with real weights, fast on CPU).

No eager mode: every task here is published by name with core.producer and consumed by the worker
process, exactly as the API does it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from PIL import Image as PILImage
from sqlalchemy import func, select

from core import producer, tasks
from core import repository as repo
from core.db import session_scope
from core.settings import Settings, get_settings
from core.store import FileStore
from core.tables import Explanation, Image, PatientResult, Prediction, utcnow
from tests.conftest import WorkerProcess

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")
DEV_MODEL = "drscreen-dev@0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Generous: the pool child imports torch and loads the ensemble, and CI boxes are often busy.
WORKER_READY_S = 180
WAIT_S = 300

pytestmark = pytest.mark.timeout(1200)


@dataclass
class Stack:
    url: str
    store: FileStore
    app: Celery
    worker: WorkerProcess
    import_root: Path


@pytest.fixture
def stack(
    request: pytest.FixtureRequest,
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: Callable[..., WorkerProcess],
) -> Iterator[Stack]:
    # DRSCREEN_TEST_MODELS_DIR points the tests at another models folder (as in tests/api_support).
    models_dir = Path(os.environ.get("DRSCREEN_TEST_MODELS_DIR") or REPO_ROOT / "models")
    if not (models_dir / "ensembles" / "drscreen-dev" / "0.1.0" / "manifest.json").is_file():
        pytest.fail(f"{DEV_MODEL} is not released under {models_dir}", pytrace=False)
    import_root = tmp_path / "imports"
    import_root.mkdir()
    env = {
        "DRSCREEN_DATABASE_URL": pg_url,
        "DRSCREEN_BROKER_URL": redis_url,
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
        "DRSCREEN_STORE_DIR": str(tmp_path / "store"),
        "DRSCREEN_IMPORT_ROOTS": str(import_root),
        "DRSCREEN_MODEL": DEV_MODEL,
        "DRSCREEN_MODELS_DIR": str(models_dir),
        "DRSCREEN_TORCH_THREADS": "1",
        "DRSCREEN_SWEEP_INTERVAL_S": "0",  # the test sends its own sweep
        "OMP_NUM_THREADS": "1",
        **getattr(request, "param", {}),  # a test's own settings (indirect parametrization)
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    worker = start_worker(env=env, ready_timeout=WORKER_READY_S)
    settings = Settings()
    yield Stack(
        pg_url, FileStore(settings.store_path), producer.make_producer_app(settings), worker, import_root
    )


def wait_for(check: Callable[[], bool], worker: WorkerProcess, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{worker.output()[-6000:]}")


def statuses(url: str, ids: list[str]) -> dict[str, str]:
    with session_scope(url) as s:
        return {im.id: im.status for im in repo.get_images(s, ids)}


def all_finished(url: str, ids: list[str]) -> Callable[[], bool]:
    return lambda: (
        set(statuses(url, ids).values()) <= {"done", "failed"} and len(statuses(url, ids)) == len(ids)
    )


def add_photos(stack: Stack, clinic: str, patient: str, names: list[str], bundle: bool = False) -> list[str]:
    ids = []
    with session_scope(stack.url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        p = repo.get_or_create_patient(s, c.id, patient)
        bundle_id = repo.create_bundle(s, c.id, p.id).id if bundle else None
        for name in names:
            stored = stack.store.put_bytes((PHOTOS / name).read_bytes(), "jpg")
            ids.append(
                repo.create_image(
                    s,
                    clinic_id=c.id,
                    patient_id=p.id,
                    eye="left" if "_left" in name else "right",
                    sha256=stored.sha256,
                    stored_path=stored.relpath,
                    size_bytes=stored.size_bytes,
                    filename=name,
                    bundle_id=bundle_id,
                ).id
            )
    return ids  # committed before anything is published


def counts_for(url: str, ids: list[str], patient_id: int) -> tuple[int, int]:
    with session_scope(url) as s:
        preds = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.image_id.in_(ids)))
        results = s.scalar(
            select(func.count()).select_from(PatientResult).where(PatientResult.patient_id == patient_id)
        )
        return int(preds or 0), int(results or 0)


def test_bundle_end_to_end_with_explanations_and_redelivery(stack: Stack) -> None:
    names = ["1012_left.jpg", "1017_left.jpg", "1012_right.jpg", "1017_right.jpg"]
    ids = add_photos(stack, "Bundle clinic", "B-1", names, bundle=True)
    producer.send_score_images(ids, app=stack.app)
    wait_for(all_finished(stack.url, ids), stack.worker, "the bundle to be scored")

    with session_scope(stack.url) as s:
        images = repo.get_images(s, ids)
        assert {im.status for im in images} == {"done"}, [im.error for im in images]
        patient_id = images[0].patient_id
        mv = repo.latest_model_version(s)
        preds = repo.predictions_for_images(s, ids)
        assert set(preds) == set(ids)
        assert {repo.get_model_version(s, p.model_version_id).ref for p in preds.values()} == {DEV_MODEL}  # type: ignore[union-attr]
        for im in images:
            p = preds[im.id]
            if im.gradable:
                assert p.grade in range(5) and abs(sum(p.probabilities or []) - 1) < 1e-3
                assert p.referable is (p.grade is not None and p.grade >= 2) and p.members
            else:
                assert p.grade is None and p.referable
        bundle = repo.get_bundle(s, images[0].bundle_id or "")
        assert bundle is not None and bundle.status == "done"
        result = repo.get_current_patient_result(s, patient_id)
        assert result is not None and {e.eye for e in result.eyes} == {"left", "right"}
        eye_grades = [e.grade for e in result.eyes if e.grade is not None]
        assert result.grade == (max(eye_grades) if eye_grades else None)
        gradable_ids = [im.id for im in images if im.gradable]
        assert mv is not None
    assert gradable_ids, "the quality gate rejected every sample photo"

    # Heatmaps arrive on the explain queue: PNG, the photograph's own size.
    def explained() -> bool:
        with session_scope(stack.url) as s:
            n = s.scalar(select(func.count()).select_from(Explanation).where(Explanation.image_id.in_(ids)))
            return int(n or 0) == len(gradable_ids)

    wait_for(explained, stack.worker, "the heatmaps")
    with session_scope(stack.url) as s:
        for image_id in gradable_ids:
            exp = repo.get_explanation(s, image_id)
            shown = repo.get_image(s, image_id)
            assert exp is not None and shown is not None
            png = PILImage.open(io.BytesIO(stack.store.read_bytes(exp.stored_path)))
            png.load()
            photo = PILImage.open(io.BytesIO(stack.store.read_bytes(shown.stored_path)))
            assert png.format == "PNG" and png.size == photo.size

    # Redelivery: the same message twice more writes no prediction and no patient result.
    before = counts_for(stack.url, ids, patient_id)
    producer.send_score_images(ids, app=stack.app)
    producer.send(tasks.SCORE_IMAGES, [ids], {"explain": True}, app=stack.app)
    # A later message (one worker, prefetch 1) marks when those were consumed: behind the second
    # on the scoring queue, and the worker takes from the uploads queue (the first) in turn with it
    [marker] = add_photos(stack, "Bundle clinic", "B-marker", ["1020_left.jpg"])
    producer.send(tasks.SCORE_IMAGES, [[marker]], {}, app=stack.app)
    wait_for(all_finished(stack.url, [marker]), stack.worker, "the marker image")
    assert counts_for(stack.url, ids, patient_id) == before

    # Screened again a year later: a new current result, last year's kept as history.
    [later] = add_photos(stack, "Bundle clinic", "B-1", ["1021_left.jpg"])
    producer.send_score_images([later], app=stack.app)
    wait_for(all_finished(stack.url, [later]), stack.worker, "the follow-up image")
    with session_scope(stack.url) as s:
        history = repo.patient_history(s, patient_id)
        assert len(history) == 2 and history[0].is_current and not history[1].is_current
        assert later in next(e for e in history[0].eyes if e.eye == "left").image_ids


def add_encoded(stack: Stack, clinic: str, patient: str, files: dict[str, bytes]) -> list[str]:
    """Photographs given as bytes, one left eye each, committed before anything is published."""
    ids = []
    with session_scope(stack.url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        p = repo.get_or_create_patient(s, c.id, patient)
        for name, data in files.items():
            stored = stack.store.put_bytes(data, name.rsplit(".", 1)[1])
            ids.append(
                repo.create_image(
                    s,
                    clinic_id=c.id,
                    patient_id=p.id,
                    eye="left",
                    sha256=stored.sha256,
                    stored_path=stored.relpath,
                    size_bytes=stored.size_bytes,
                    filename=name,
                ).id
            )
    return ids


def test_12_bit_and_bordered_copies_grade_as_the_photograph(stack: Stack) -> None:
    """Session 32: a worker graded a 16-bit PNG of 12-bit data ungradable (underexposed) and the
    photograph pasted on a black canvas ungradable (poor_field_of_view); both are the photograph."""
    import cv2
    import numpy as np

    from ml.imageio import decode_image

    rgb = decode_image((PHOTOS / "1012_left.jpg").read_bytes())
    twelve = np.rint(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
    canvas = np.zeros((5 * 512, 5 * 512, 3), np.uint8)
    canvas[700 : 700 + rgb.shape[0], 1200 : 1200 + rgb.shape[1]] = rgb
    files = {
        "plain.png": cv2.imencode(".png", rgb[..., ::-1])[1].tobytes(),
        "twelve-bit.png": cv2.imencode(".png", twelve[..., ::-1])[1].tobytes(),
        "bordered.png": cv2.imencode(".png", canvas[..., ::-1])[1].tobytes(),
    }
    ids = add_encoded(stack, "Depth clinic", "D-1", files)
    producer.send_score_images(ids, app=stack.app)
    wait_for(all_finished(stack.url, ids), stack.worker, "the copies to be scored")
    with session_scope(stack.url) as s:
        images = {im.id: im for im in repo.get_images(s, ids)}
        preds = repo.predictions_for_images(s, ids)
        plain = preds[ids[0]]
        assert images[ids[0]].gradable and plain.grade is not None
        for image_id, name in zip(ids[1:], list(files)[1:], strict=True):
            assert images[image_id].status == "done" and images[image_id].gradable, (name, preds[image_id])
            # the same pixels, and on a 5x canvas the same crop: the same forward pass
            assert preds[image_id].grade == plain.grade, name
            assert preds[image_id].probabilities == plain.probabilities, name


def test_folder_job_of_three_dozen_photographs(stack: Stack) -> None:
    folder = stack.import_root / "clinic-export"
    folder.mkdir()
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))[:36]
    for name in names:
        shutil.copy(PHOTOS / name, folder / name)
    (folder / "README.txt").write_text("exported from the clinic camera\n")
    data = (PHOTOS / names[0]).read_bytes()
    (folder / "9999_left.jpg").write_bytes(data[: len(data) // 3])  # truncated transfer
    with session_scope(stack.url) as s:
        clinic = repo.get_or_create_clinic(s, "Folder clinic")
        job_id = repo.create_job(s, clinic.id, str(folder)).id
    producer.send_expand_folder(job_id, app=stack.app)

    def job_done() -> bool:
        with session_scope(stack.url) as s:
            job = repo.get_job(s, job_id)
            return job is not None and job.status in ("done", "failed")

    wait_for(job_done, stack.worker, "the folder job", timeout=2 * WAIT_S)
    with session_scope(stack.url) as s:
        job = repo.get_job(s, job_id)
        assert job is not None and job.status == "done", job.error if job else None
        assert (job.total, job.done, job.failed) == (38, 36, 2)
        items = {i.path: i for i in repo.job_items(s, job_id)}
        assert items["README.txt"].status == "failed" and "not_an_image" in (items["README.txt"].error or "")
        assert items["9999_left.jpg"].status == "failed"
        assert (items["9999_left.jpg"].error or "").startswith("truncated")
        grades = repo.job_grade_counts(s, job_id)
        assert sum(grades.values()) == 36
        # Every patient of the folder has a current aggregate over both eyes.
        patients = {n.split("_")[0] for n in names}
        for external_id in patients:
            p = repo.get_patient(s, clinic.id, external_id)
            assert p is not None
            result = repo.get_current_patient_result(s, p.id)
            assert result is not None and {e.eye for e in result.eyes} == {"left", "right"}
        # Folder jobs do not draw heatmaps unless asked.
        job_images = [i.image_id for i in items.values() if i.image_id]
        n_exp = s.scalar(
            select(func.count()).select_from(Explanation).where(Explanation.image_id.in_(job_images))
        )
        assert n_exp == 0
    # Batching: 36 photographs went out as a couple of score_images tasks, not 36.
    log = stack.worker.output()
    assert log.count(f"Task {tasks.SCORE_IMAGES}[") <= 2 * 4, log[-3000:]


@pytest.mark.parametrize(
    ("stack", "label"),
    [({"DRSCREEN_RUNTIME": "openvino"}, "openvino f32"), ({"DRSCREEN_RUNTIME": "onnx"}, "onnx")],
    indirect=["stack"],
)
def test_cpu_runtime_workers_grade_as_onnx_runtime_does(stack: Stack, label: str) -> None:
    """Each CPU runtime in a real worker (``auto`` picks OpenVINO where installed, so ONNX Runtime
    is asked for by name here) stores what ONNX Runtime computes in this process for the same
    photographs; OpenVINO runs float32 (the dev ensemble ships no bfloat16 verdict)."""
    from ml.inference import load_ensemble
    from ml.training.data import load_rgb

    names = ["1012_left.jpg", "1017_left.jpg", "1012_right.jpg", "1017_right.jpg"]
    ids = add_photos(stack, f"{label} clinic", "RT-1", names)
    producer.send_score_images(ids, app=stack.app)
    wait_for(all_finished(stack.url, ids), stack.worker, f"{label} scoring")
    reference = load_ensemble(DEV_MODEL, runtime="onnx", threads=1).predict(
        [load_rgb(PHOTOS / n) for n in names]
    )
    with session_scope(stack.url) as s:
        preds = repo.predictions_for_images(s, ids)
        compared = 0
        for image_id, expected in zip(ids, reference, strict=True):
            got = preds[image_id]
            if not got.gradable:  # the quality gate's verdict, which predict() does not apply
                continue
            assert got.grade == expected.grade and got.probabilities is not None
            assert (
                max(abs(a - b) for a, b in zip(got.probabilities, expected.probabilities, strict=True)) < 1e-4
            )
            compared += 1
        assert compared, "the quality gate rejected every photograph: nothing compared"
    assert f"runtime {label})" in stack.worker.output()


def test_sweep_requeues_a_stuck_image(stack: Stack) -> None:
    [stuck] = add_photos(stack, "Sweep clinic", "S-1", ["102_left.jpg"])
    with session_scope(stack.url) as s:
        row = s.get(Image, stuck)
        assert row is not None
        # Its worker died mid-way: running for two hours, no message anywhere.
        row.status, row.started_at = "running", utcnow() - timedelta(hours=2)
        row.updated_at = utcnow() - timedelta(hours=2)
    producer.send_sweep(app=stack.app)
    wait_for(all_finished(stack.url, [stuck]), stack.worker, "the swept image")
    assert statuses(stack.url, [stuck]) == {stuck: "done"}


def test_a_killed_pool_child_is_replaced_and_keeps_scoring(stack: Stack) -> None:
    # The replacement child loads torch and the ensemble again before it reports "up"; Celery
    # must wait for it (worker_proc_alive_timeout) instead of killing it after 4 s, over and over.
    served = re.compile(r"worker process (\d+) serves")
    wait_for(lambda: bool(served.search(stack.worker.output())), stack.worker, "the pool child")
    [first_pid] = served.findall(stack.worker.output())
    os.kill(int(first_pid), signal.SIGKILL)
    wait_for(lambda: len(served.findall(stack.worker.output())) >= 2, stack.worker, "a new pool child")
    [image] = add_photos(stack, "Crash clinic", "C-1", ["1012_left.jpg"])
    producer.send_score_images([image], app=stack.app)
    wait_for(all_finished(stack.url, [image]), stack.worker, "the image after the crash")
    assert statuses(stack.url, [image]) == {image: "done"}
    log = stack.worker.output()
    assert "Timed out waiting for UP message" not in log, log[-3000:]
    assert len(set(served.findall(log))) == 2, log[-3000:]
