"""The plain scoring and explanation functions on SQLite (no broker, no worker process).

The ensemble here is a small deterministic stand-in with the same interface as
``ml.inference.Ensemble``: these tests are about persistence, idempotency and failure handling;
the real models are exercised by the integration tests.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, update

from core import repository as repo
from core import tasks
from core.aggregation import argmax_grade
from core.db import session_scope
from core.migrate import upgrade
from core.store import FileStore
from core.tables import AuditEvent, Explanation, Image, PatientResult, Prediction, utcnow
from services.views import image_result
from workers import explain as explain_mod
from workers import scoring

PHOTOS = Path("/work/shared/data/eyepacs-natural-512/images")


@dataclass
class StubPrediction:
    probabilities: list[float]
    grade: int
    members: dict[str, list[float]]
    heatmap: np.ndarray | None = None


@dataclass
class StubEnsemble:
    """``maps_in_pass``: draws the heatmaps asked for with the grades, as the ONNX Runtime and
    OpenVINO ensembles do (False: as the PyTorch one, leaving them to ``explain``)."""

    ref: str = "stub-ensemble@0.0.1"
    card: dict[str, Any] = field(default_factory=lambda: {"stub": True})
    quality_thresholds: dict[str, float] | None = None
    batches: list[int] = field(default_factory=list)
    maps_in_pass: bool = False

    def predict(
        self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None
    ) -> list[StubPrediction]:
        self.batches.append(len(images))
        flags = list(heatmaps or [False] * len(images))
        out = []
        for img, flag in zip(images, flags, strict=True):
            grade = int(img.mean()) % 5
            probs = [0.05] * 5
            probs[grade] = 0.8
            heat = self.explain(img) if flag and self.maps_in_pass else None
            out.append(StubPrediction(probs, grade, {"stub-member@0.0.1": probs}, heat))
        return out

    def grade_from_probabilities(self, probs: Sequence[float]) -> int:
        return argmax_grade(probs)

    def grade_eye(self, probabilities: Sequence[float], members: Mapping[str, Sequence[float]] | None) -> int:
        return argmax_grade(probabilities)

    def explain(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return np.linspace(0.0, 1.0, h * w, dtype=np.float32).reshape(h, w)


class Sent(list[tuple[str, list[Any], dict[str, Any]]]):
    def __call__(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.append((name, args, kwargs))


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'db' / 'unit.db'}"
    upgrade(u)
    return u


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.fixture
def ens() -> StubEnsemble:
    return StubEnsemble()


@pytest.fixture
def sent() -> Sent:
    return Sent()


def gray_png(size: int = 256) -> bytes:
    """A valid image that is not a fundus photograph (the quality gate must reject it)."""
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return buf.getvalue()


def add_images(
    url: str,
    store: FileStore,
    patient: str,
    files: Sequence[tuple[str, bytes, str]],
    *,
    clinic: str = "North",
    bundle: bool = False,
    job_id: str | None = None,
) -> list[str]:
    """Create rows (and store bytes) like the API does; returns image ids."""
    ids = []
    with session_scope(url) as s:
        c = repo.get_or_create_clinic(s, clinic)
        p = repo.get_or_create_patient(s, c.id, patient)
        bundle_id = repo.create_bundle(s, c.id, p.id).id if bundle else None
        for name, data, eye in files:
            stored = store.put_bytes(data, name.rsplit(".", 1)[-1])
            im = repo.create_image(
                s,
                clinic_id=c.id,
                patient_id=p.id,
                eye=eye,
                sha256=stored.sha256,
                stored_path=stored.relpath,
                size_bytes=stored.size_bytes,
                filename=name,
                bundle_id=bundle_id,
                job_id=job_id,
            )
            ids.append(im.id)
    return ids


def job_with_photo(
    url: str, store: FileStore, patient: str, name: str, folder: str = "/data"
) -> tuple[str, str]:
    """A folder job of one photograph, its item linked and queued as a worker's expansion leaves
    it: (job id, image id)."""
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        job_id = repo.create_job(s, clinic.id, folder).id
        repo.add_job_items(s, job_id, [repo.JobItemSpec(name, patient, photo(name)[2])])
    [image_id] = add_images(url, store, patient, [photo(name)], job_id=job_id)
    with session_scope(url) as s:
        repo.set_job_item(s, repo.job_items(s, job_id)[0], status="queued", image_id=image_id)
    return job_id, image_id


def photo(name: str) -> tuple[str, bytes, str]:
    return name, (PHOTOS / name).read_bytes(), "left" if "_left" in name else "right"


BUNDLE = ["16_left.jpg", "17_left.jpg", "16_right.jpg", "17_right.jpg"]


def count(url: str, table: Any) -> int:
    with session_scope(url) as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_bundle_scored_in_one_batch(url: str, store: FileStore, ens: StubEnsemble, sent: Sent) -> None:
    ids = add_images(url, store, "P1", [photo(n) for n in BUNDLE], bundle=True)
    summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)

    assert sorted(summary.scored + summary.ungradable) == sorted(ids) and not summary.failed
    assert ens.batches == [len(summary.scored)]  # one predict call for the whole batch
    with session_scope(url) as s:
        images = repo.get_images(s, ids)
        assert {im.status for im in images} == {"done"}
        assert all(im.width == 512 or im.height == 512 for im in images)
        preds = repo.predictions_for_images(s, ids)
        assert set(preds) == set(ids)
        for im in images:
            pred = preds[im.id]
            assert pred.gradable is bool(im.gradable)
            if pred.gradable:
                assert pred.grade is not None and len(pred.probabilities or []) == 5
                assert pred.referable is (pred.grade >= 2)
                assert pred.members and "stub-member@0.0.1" in pred.members
            else:
                assert pred.grade is None and pred.referable is True
            assert im.quality is not None and "fundus" in im.quality
        bundle = repo.get_bundle(s, images[0].bundle_id or "")
        assert bundle is not None and bundle.status == "done"
        result = repo.get_current_patient_result(s, images[0].patient_id)
        assert result is not None and result.trigger == f"bundle:{bundle.id}"
        assert {e.eye for e in result.eyes} == {"left", "right"}
        assert len(repo.patient_history(s, images[0].patient_id)) == 1
    # Heatmaps for the gradable images, on the explain queue's task, after the commit.
    assert sent == [(tasks.EXPLAIN_IMAGE, [i], {}) for i in summary.scored]


def test_redelivered_batch_writes_nothing(url: str, store: FileStore, ens: StubEnsemble, sent: Sent) -> None:
    ids = add_images(url, store, "P1", [photo(n) for n in BUNDLE])
    scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
    before = (count(url, Prediction), count(url, PatientResult), len(sent))
    again = scoring.score_images(ids + ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert sorted(again.skipped) == sorted(ids) and not again.scored and not again.patients
    assert (count(url, Prediction), count(url, PatientResult), len(sent)) == before
    assert ens.batches == ens.batches[:1]  # the model did not run again


def test_bad_photos_fail_alone(url: str, store: FileStore, ens: StubEnsemble, sent: Sent) -> None:
    good = (PHOTOS / "16_left.jpg").read_bytes()
    truncated = good[: len(good) // 2]
    ids = add_images(
        url,
        store,
        "P2",
        [
            ("a_left.jpg", good, "left"),
            ("b_left.jpg", truncated, "left"),
            ("c_right.png", gray_png(), "right"),
        ],
    )
    summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert summary.failed == [ids[1]]
    assert ids[2] in summary.ungradable
    with session_scope(url) as s:
        bad = repo.get_image(s, ids[1])
        assert bad is not None and bad.status == "failed" and (bad.error or "").startswith("truncated")
        gray = repo.get_image(s, ids[2])
        assert gray is not None and gray.status == "done" and gray.gradable is False
        assert "not_fundus" in (gray.quality or {}).get("reasons", [])
        result = repo.get_current_patient_result(s, gray.patient_id)
        # The right eye has only an ungradable photo: the patient is referable whatever the left.
        assert result is not None and result.referable is True
        right = next(e for e in result.eyes if e.eye == "right")
        assert right.gradable is False and right.grade is None
        # the contract: 5 probabilities whenever an image is done, ungradable ones included (the
        # contract audit: they were null); they decide nothing (grade null, referable, not counted)
        shown = image_result(s, gray)
        assert shown.probabilities is not None and len(shown.probabilities) == 5 and shown.members
        assert shown.grade is None and shown.gradable is False and shown.referable is True
        assert shown.explanation_url is None
    assert ids[2] not in summary.explain_sent + summary.explained  # no heatmap for it


def test_an_ungradable_photographs_stored_prediction_is_referable(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent
) -> None:
    """The session-31 mutation review: no test read the prediction row the worker writes for an
    ungradable photograph. Written "not referable", a reader of the row that does not apply the
    rule again (``drscreen score``'s per-image output) would tell a clinic that a photograph
    nobody could grade needs no referral."""
    [image_id] = add_images(url, store, "P-ug", [("ug_left.png", gray_png(), "left")])
    summary = scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert summary.ungradable == [image_id]
    with session_scope(url) as s:
        [pred] = s.scalars(select(Prediction).where(Prediction.image_id == image_id)).all()
        assert (pred.gradable, pred.referable, pred.grade) == (False, True, None)


def test_missing_ids_and_attempt_cap(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent, caplog: pytest.LogCaptureFixture
) -> None:
    [image_id] = add_images(url, store, "P3", [photo("16_left.jpg")])
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None
        row.attempts = 5  # five earlier deliveries never finished
    with caplog.at_level("WARNING"):
        summary = scoring.score_images(
            [image_id, "0" * 32], ensemble=ens, store=store, db_url=url, enqueue=sent
        )
    assert summary.failed == [image_id] and summary.skipped == ["0" * 32]
    # an id this database never saw: said (a worker on another database than the API's)
    assert "unknown to this worker's database" in caplog.text
    assert ens.batches == []
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None and row.status == "failed" and "attempts" in (row.error or "")


@pytest.mark.parametrize("erased_hours_ago", [0.0, 30.0])
def test_a_message_for_a_photograph_erased_meanwhile_is_not_blamed_on_the_configuration(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent, caplog: pytest.LogCaptureFixture,
    erased_hours_ago: float,
) -> None:  # fmt: skip
    """A forced erasure while the photograph was queued: its message then names an id this
    database lacks. Said at INFO as erased meanwhile when the erasure is recent; an erasure
    older than a day explains nothing, so the warning stays (naming both causes)."""
    from core import retention

    [image_id] = add_images(url, store, "P-ERASED", [photo("16_left.jpg")])
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        out = retention.erase_patient(s, clinic.id, "P-ERASED", force=True, store_dir=store.root)
        assert out.in_flight == 1
        s.flush()
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "patient.erase")).one()
        event.at = utcnow() - timedelta(hours=erased_hours_ago)
    with caplog.at_level("INFO", logger="workers.scoring"):
        summary = scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert summary.skipped == [image_id] and ens.batches == []
    [record] = [r for r in caplog.records if "unknown to this worker's database" in r.getMessage()]
    if erased_hours_ago < 24:
        assert record.levelname == "INFO" and "erased meanwhile?" in record.getMessage()
    else:
        assert record.levelname == "WARNING" and "DRSCREEN_DATABASE_URL" in record.getMessage()
        assert "erased longer ago" in record.getMessage()


def test_explain_policy(
    url: str, store: FileStore, ens: StubEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        job_id = repo.create_job(s, clinic.id, "/nowhere").id
    job_ids = add_images(url, store, "P4", [photo("16_left.jpg")], job_id=job_id)
    single = add_images(url, store, "P5", [photo("17_left.jpg")])
    sent = Sent()
    scoring.score_images(job_ids + single, ensemble=ens, store=store, db_url=url, enqueue=sent)
    # Folder-job images: no heatmap unless the job asks; single images: on by default.
    assert [a[0] for _, a, _ in sent] == single
    # sent without the option (a newer release grading a job's photograph again): the job's own
    # option decides (they were drawn for no job's photograph: the session-30 review)
    with session_scope(url) as s:
        asking = repo.create_job(s, clinic.id, "/nowhere", explain=True).id
    asked = add_images(url, store, "P8", [photo("17_left.jpg")], job_id=asking)
    sent = Sent()
    scoring.score_images(asked, ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert [a[0] for _, a, _ in sent] == asked

    from workers.settings import get_worker_settings

    monkeypatch.setenv("DRSCREEN_EXPLAIN", "false")
    get_worker_settings.cache_clear()
    try:
        more = add_images(url, store, "P6", [photo("16_right.jpg")])
        quiet = Sent()
        scoring.score_images(more, ensemble=ens, store=store, db_url=url, enqueue=quiet)
        assert quiet == []
        forced = add_images(url, store, "P7", [photo("17_right.jpg")])
        loud = Sent()
        scoring.score_images(forced, explain=True, ensemble=ens, store=store, db_url=url, enqueue=loud)
        assert len(loud) == 1
    finally:
        get_worker_settings.cache_clear()


def test_explain_image_png_and_idempotent(url: str, store: FileStore, ens: StubEnsemble, sent: Sent) -> None:
    [image_id] = add_images(url, store, "P8", [photo("16_left.jpg")])
    scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent)
    with session_scope(url) as s:
        gradable = bool(repo.get_image(s, image_id).gradable)  # type: ignore[union-attr]
    if not gradable:
        pytest.skip("the quality gate rejected this sample photo")
    rel = explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url)
    assert rel is not None
    png = PILImage.open(io.BytesIO(store.read_bytes(rel)))
    original = PILImage.open(PHOTOS / "16_left.jpg")
    assert png.format == "PNG" and png.size == original.size
    assert explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url) == rel
    assert count(url, Explanation) == 1


def test_heatmaps_drawn_with_the_grade_are_recorded_in_its_transaction(
    url: str, store: FileStore, sent: Sent
) -> None:
    """An ensemble that draws heatmaps in the grading pass: each wanted one is stored and its row
    written with the grade; no explain task is sent; folder-job images (not asked) get none."""
    ens = StubEnsemble(maps_in_pass=True)
    with session_scope(url) as s:
        job_id = repo.create_job(s, repo.get_or_create_clinic(s, "North").id, "/nowhere").id
    in_job = add_images(url, store, "P11", [photo("16_left.jpg")], job_id=job_id)
    ids = add_images(url, store, "P12", [photo(n) for n in BUNDLE], bundle=True)
    summary = scoring.score_images(in_job + ids, ensemble=ens, store=store, db_url=url, enqueue=sent)

    gradable = [i for i in ids if i in summary.scored]
    assert gradable and sorted(summary.explained) == sorted(gradable)
    assert sent == [] and summary.explain_sent == []
    with session_scope(url) as s:
        rows = {e.image_id: e for e in s.scalars(select(Explanation))}
        assert set(rows) == set(gradable)  # none for the job's photograph
        for image_id, row in rows.items():
            png = PILImage.open(io.BytesIO(store.read_bytes(row.stored_path)))
            assert png.format == "PNG" and png.size == (512, 342), image_id
    # the explain task finds them drawn: it neither draws again nor adds a row
    first = gradable[0]
    assert explain_mod.explain_image(first, ensemble=ens, store=store, db_url=url) == rows[first].stored_path
    assert count(url, Explanation) == len(gradable)


def test_a_heatmap_that_fails_to_draw_goes_to_the_explain_queue(
    url: str, store: FileStore, sent: Sent
) -> None:
    class WrongShape(StubEnsemble):
        def explain(self, image: np.ndarray) -> np.ndarray:
            return np.zeros((3, 3), np.float32)  # overlay_png refuses a map of another size

    [image_id] = add_images(url, store, "P13", [photo("16_left.jpg")])
    summary = scoring.score_images(
        [image_id], ensemble=WrongShape(maps_in_pass=True), store=store, db_url=url, enqueue=sent
    )
    assert summary.scored == [image_id] and summary.explained == []
    assert sent == [(tasks.EXPLAIN_IMAGE, [image_id], {})]
    assert count(url, Explanation) == 0


def test_explain_skips_unscored(url: str, store: FileStore, ens: StubEnsemble) -> None:
    [image_id] = add_images(url, store, "P9", [photo("16_left.jpg")])
    assert explain_mod.explain_image(image_id, ensemble=ens, store=store, db_url=url) is None
    assert explain_mod.explain_image("f" * 32, ensemble=ens, store=store, db_url=url) is None


def test_decoded_photographs_are_not_all_held(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper thread runs a bounded distance ahead and pixels are dropped once graded: a task
    of full-size clinic photographs must not hold every decoded one at once."""
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))[:24]
    ids = add_images(url, store, "P4", [photo(n) for n in names])
    prepared: list[Any] = []
    alive: list[int] = []
    original = scoring._prepare

    def counting(it: Any, *args: Any) -> Any:
        alive.append(sum(p.rgb is not None for p in prepared))
        prepared.append(it)
        return original(it, *args)

    monkeypatch.setattr(scoring, "_prepare", counting)
    summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert len(summary.scored) + len(summary.ungradable) == len(ids) > 2 * scoring.PREDICT_BATCH
    assert max(alive) <= 2 * scoring.PREDICT_BATCH
    assert all(p.rgb is None and p.size is not None for p in prepared)
    with session_scope(url) as s:
        assert all(im.width and im.height for im in repo.get_images(s, ids))


def test_camera_size_jpeg_is_graded_from_a_reduced_decode_and_keeps_its_size(
    url: str, store: FileStore, sent: Sent
) -> None:
    """A 3888 x 2592 camera photograph reaches the ensemble decoded at half scale (shorter side
    still >= 1024, ml.quality.DECODE_MIN_SIDE); the image row keeps the photograph's own size."""
    with PILImage.open(PHOTOS / "16_left.jpg") as im:
        big = im.convert("RGB").resize((3888, 2592), PILImage.LANCZOS)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    seen: list[tuple[int, ...]] = []

    class Recording(StubEnsemble):
        def predict(
            self, images: Sequence[np.ndarray], heatmaps: Sequence[bool] | None = None
        ) -> list[StubPrediction]:
            seen.extend(img.shape for img in images)
            return super().predict(images, heatmaps)

    [image_id] = add_images(url, store, "P10", [("camera_left.jpg", buf.getvalue(), "left")])
    summary = scoring.score_images([image_id], ensemble=Recording(), store=store, db_url=url, enqueue=sent)
    assert summary.scored == [image_id], "the gate should pass an enlarged real photograph"
    assert seen == [(1296, 1944, 3)]
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None and (row.width, row.height) == (3888, 2592)


@pytest.fixture(autouse=True)
def _no_global_ensemble(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing here may fall back to loading the released ensemble."""
    from workers import model

    def refuse(*_: Any) -> Any:
        raise AssertionError("test tried to load a real ensemble")

    monkeypatch.setattr(model, "load", refuse)
    yield


def test_a_new_release_rescores_the_patients_earlier_photographs(url: str, store: FileStore) -> None:
    """A patient's result comes from one release: when a new release scores a photograph of a
    patient, that patient's photographs an earlier release scored are queued again for it; a worker
    still serving the earlier release leaves the newer release's grades alone."""
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")
    first = add_images(url, store, "P1", [photo("16_left.jpg"), photo("16_right.jpg")])
    assert scoring.score_images(first, ensemble=old, store=store, db_url=url, enqueue=Sent()).rescore == []

    later = add_images(url, store, "P1", [photo("17_left.jpg")])
    sent = Sent()
    summary = scoring.score_images(later, ensemble=new, store=store, db_url=url, enqueue=sent)
    assert sorted(summary.rescore) == sorted(first)
    assert (tasks.SCORE_IMAGES, [summary.rescore], {}) in sent
    with session_scope(url) as s:
        assert {im.status for im in repo.get_images(s, first)} == {"queued"}
        # the earlier release's referral stands until they are in (session 32: a partial result
        # withdrew it); a "not referable" one is replaced at once, below
        interim = repo.get_current_patient_result(s, repo.get_images(s, later)[0].patient_id)
        assert interim is not None and interim.referable
        assert interim.model_version_id == repo.get_model_version_by_ref(s, old.ref).id  # type: ignore[union-attr]

    again = scoring.score_images(first, ensemble=new, store=store, db_url=url, enqueue=Sent())
    assert again.rescore == [] and sorted(again.scored + again.ungradable) == sorted(first)
    with session_scope(url) as s:
        images = repo.get_images(s, [*first, *later])
        result = repo.get_current_patient_result(s, images[0].patient_id)
        version = repo.get_model_version_by_ref(s, new.ref)
        assert result is not None and version is not None and result.model_version_id == version.id
        counted = {i for eye in result.eyes for i in eye.image_ids}
        assert counted == {im.id for im in images if im.gradable} and len(counted) >= 2
        assert all(len(repo.predictions_for_images(s, [i], version.id)) == 1 for i in first)

    # A worker still on the earlier release scores one more photograph: nothing is re-queued.
    extra = add_images(url, store, "P1", [photo("17_right.jpg")])
    stale = scoring.score_images(extra, ensemble=old, store=store, db_url=url, enqueue=(sent := Sent()))
    assert stale.rescore == [] and all(name != tasks.SCORE_IMAGES for name, _, _ in sent)


def test_a_new_release_leaves_an_earlier_visit_as_it_was_graded(url: str, store: FileStore) -> None:
    """Only the latest visit is the patient's result, so only its photographs are scored again by a
    new release. Re-scoring a visit of a month ago put its photographs back in the queue, its
    bundle back to running, and replaced its entry in the history by the new release's recompute."""
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")
    first = add_images(url, store, "P1", [photo("16_left.jpg"), photo("16_right.jpg")], bundle=True)
    scoring.score_images(first, ensemble=old, store=store, db_url=url, enqueue=Sent())
    a_month_ago = utcnow() - timedelta(days=30)
    with session_scope(url) as s:
        s.execute(update(Image).values(created_at=a_month_ago, sent_at=a_month_ago))
        s.execute(update(PatientResult).values(computed_at=a_month_ago))
    later = add_images(url, store, "P1", [photo("17_left.jpg"), photo("17_right.jpg")], bundle=True)
    summary = scoring.score_images(later, ensemble=new, store=store, db_url=url, enqueue=Sent())
    assert summary.rescore == []
    with session_scope(url) as s:
        images = repo.get_images(s, first)
        assert {im.status for im in images} == {"done"}
        history = repo.patient_history(s, images[0].patient_id)
        refs = [repo.get_model_version(s, r.model_version_id).ref for r in history]  # type: ignore[union-attr]
        assert refs[0] == new.ref and old.ref in refs  # the month-old visit's entry is still there
        newest = {i for eye in history[0].eyes for i in eye.image_ids}
        assert newest == set(later)


def test_a_job_waits_for_a_photograph_a_newer_release_grades_again(url: str, store: FileStore) -> None:
    """The review: with a job's items counted done by their own status, a job whose photograph a newer
    release re-queued finished while that photograph waited (its result row "queued", no grade)."""
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")
    with session_scope(url) as s:
        clinic = repo.get_or_create_clinic(s, "North")
        job_id = repo.create_job(s, clinic.id, "/data").id
        repo.add_job_items(s, job_id, [repo.JobItemSpec("16_left.jpg", "J", "left"),
                                       repo.JobItemSpec("16_right.jpg", "J", "right")])  # fmt: skip
    left, right = add_images(url, store, "J", [photo("16_left.jpg"), photo("16_right.jpg")], job_id=job_id)
    with session_scope(url) as s:
        for item, image_id in zip(repo.job_items(s, job_id), (left, right), strict=True):
            repo.set_job_item(s, item, status="queued", image_id=image_id)
    scoring.score_images([left], ensemble=old, store=store, db_url=url, enqueue=Sent())
    # a newer release grades the right eye and queues the left one again, the job still open
    assert scoring.score_images([right], ensemble=new, store=store, db_url=url, enqueue=Sent()).rescore == [
        left
    ]
    with session_scope(url) as s:
        job = repo.refresh_job_counts(s, job_id)
        assert (job.status, job.done) == ("running", 1)
        assert sum(repo.job_grade_counts(s, job_id).values()) == 1
    scoring.score_images([left], ensemble=new, store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        job = repo.refresh_job_counts(s, job_id)
        assert (job.status, job.done) == ("done", 2) and sum(repo.job_grade_counts(s, job_id).values()) == 2


def test_a_jpeg_with_shifted_blocks_is_ungradable_not_graded(
    url: str, store: FileStore, ens: StubEnsemble
) -> None:
    """Scan damage the decoder resynchronises without a warning (libjpeg-turbo's strict mode accepts
    it) shifts every later block; such a photograph was graded. Now ungradable, reason damaged_jpeg."""
    from tests.unit.test_jpeg_damage import DAMAGE

    offset, old, new = DAMAGE[2]  # the quality gate alone passes this one
    data = bytearray(photo("16_left.jpg")[1])
    assert data[offset : offset + len(old) // 2] == bytes.fromhex(old)
    data[offset : offset + len(new) // 2] = bytes.fromhex(new)
    damaged, intact = add_images(
        url, store, "DMG", [("d_left.jpg", bytes(data), "left"), photo("16_right.jpg")]
    )
    summary = scoring.score_images([damaged, intact], ensemble=ens, store=store, db_url=url, enqueue=Sent())
    assert summary.ungradable == [damaged] and summary.scored == [intact]
    with session_scope(url) as s:
        row = repo.get_image(s, damaged)
        assert row is not None and row.status == "done" and not row.gradable
        assert row.quality is not None and "damaged_jpeg" in row.quality["reasons"]


def test_switching_back_to_a_release_seen_first_grades_the_visit_again(url: str, store: FileStore) -> None:
    """The operator walkthrough: 1.6.0 seen first, 1.5.0 activated and grading a left eye, 1.6.0
    activated again: the right eye's grade by 1.6.0 did not queue the left one again (releases were
    ordered by when the database first saw them), and the patient read "left eye ungradable"
    for good while the photograph itself said gradable, grade 0."""
    first, second = StubEnsemble(ref="stub-ensemble@1.6.0"), StubEnsemble(ref="stub-ensemble@1.5.0")
    [seen] = add_images(url, store, "OTHER", [photo("17_left.jpg")])
    scoring.score_images([seen], ensemble=first, store=store, db_url=url, enqueue=Sent())  # 1.6.0 seen first
    with session_scope(url) as s:
        repo.activate_release(s, second.ref)
    [left] = add_images(url, store, "P-229", [photo("16_left.jpg")])
    scoring.score_images([left], ensemble=second, store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        repo.activate_release(s, first.ref)
    [right] = add_images(url, store, "P-229", [photo("16_right.jpg")])
    summary = scoring.score_images([right], ensemble=first, store=store, db_url=url, enqueue=Sent())
    assert summary.rescore == [left]
    scoring.score_images([left], ensemble=first, store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        patient = repo.get_patient_by_id(s, repo.get_image(s, left).patient_id)  # type: ignore[union-attr]
        result = repo.get_current_patient_result(s, patient.id)  # type: ignore[union-attr]
        assert result is not None and {e.eye: e.gradable for e in result.eyes} == {
            "left": True,
            "right": True,
        }


def test_a_job_linking_an_earlier_jobs_photograph_finishes_when_it_is_graded(
    url: str, store: FileStore
) -> None:
    """The review: a folder sent again links the existing photograph (its job_id stays the first
    job's); graded again, only the first job was refreshed and the second stayed "running" until
    someone read it."""
    old, new = StubEnsemble(ref="stub-ensemble@1.0.0"), StubEnsemble(ref="stub-ensemble@2.0.0")
    _, image_id = job_with_photo(url, store, "L", "16_left.jpg")
    scoring.score_images([image_id], ensemble=old, store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:  # the folder sent again, for a newer release (folders.ingest_item)
        second = repo.create_job(s, repo.get_or_create_clinic(s, "North").id, "/data").id
        repo.add_job_items(s, second, [repo.JobItemSpec("16_left.jpg", "L", "left")])
        repo.requeue_image(s, repo.get_image(s, image_id))  # type: ignore[arg-type]
        repo.set_job_item(s, repo.job_items(s, second)[0], status="queued", image_id=image_id)
        assert repo.refresh_job_counts(s, second).status == "running"
    scoring.score_images([image_id], ensemble=new, store=store, db_url=url, enqueue=Sent())
    with session_scope(url) as s:
        job = repo.get_job(s, second)
        assert job is not None and (job.status, job.done) == ("done", 1)


def test_a_photograph_missing_from_the_workers_store_is_retried_not_judged(
    url: str,
    store: FileStore,
    ens: StubEnsemble,
    sent: Sent,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The operator review: a worker whose DRSCREEN_STORE_DIR is not the API's failed every
    photograph for good ("stored photograph is missing: <server path>") and the patient read as
    ungradable. Now it stays queued for another worker and attempt, the path goes to the server
    log only, and only after max_attempts is it failed, saying whose problem it is."""
    [image_id] = add_images(url, store, "P-STORE", [photo("16_left.jpg")])
    elsewhere = FileStore(tmp_path / "another-machines-store")
    with caplog.at_level("ERROR"):
        summary = scoring.score_images([image_id], ensemble=ens, store=elsewhere, db_url=url, enqueue=sent)
    assert summary.missing == [image_id] and not summary.failed and summary.patients == []
    assert "DRSCREEN_STORE_DIR" in caplog.text and str(elsewhere.root) in caplog.text
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None and row.status == "queued" and row.claimed_by is None and row.attempts == 1
        assert repo.get_current_patient_result(s, row.patient_id) is None  # nothing judged
    # the right store (the sweep sent it again): graded as usual
    assert scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent).scored == [
        image_id
    ]
    # a file gone for good: failed at the last attempt, with no server path in the clinic's error
    [lost] = add_images(url, store, "P-LOST", [photo("17_left.jpg")])
    for attempt in range(1, scoring.get_worker_settings().max_attempts + 1):
        summary = scoring.score_images([lost], ensemble=ens, store=elsewhere, db_url=url, enqueue=sent)
        assert (
            summary.failed if attempt == scoring.get_worker_settings().max_attempts else summary.missing
        ) == [lost]
    with session_scope(url) as s:
        row = repo.get_image(s, lost)
        assert row is not None and row.status == "failed"
        assert "file-store problem" in (row.error or "") and str(tmp_path) not in (row.error or "")


def test_workers_serving_different_releases_are_reported(
    url: str, store: FileStore, sent: Sent, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator review: two workers on one broker with different DRSCREEN_MODEL flipped
    patients' results between releases without a word in any log or metric."""
    from prometheus_client import generate_latest

    from core.db import get_sessionmaker
    from core.settings import get_settings
    from services.metrics import Metrics

    monkeypatch.setattr(scoring, "_release_checked_at", [float("-inf")])
    first, second = add_images(url, store, "P-MIX", [photo("16_left.jpg"), photo("16_right.jpg")])
    with caplog.at_level("ERROR"):
        scoring.score_images([first], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=sent)
    assert "different releases" not in caplog.text  # one release so far
    monkeypatch.setattr(scoring, "_release_checked_at", [float("-inf")])
    other = StubEnsemble(ref="stub-other@0.0.2")
    with caplog.at_level("ERROR"):
        scoring.score_images([second], ensemble=other, store=store, db_url=url, enqueue=sent)
    assert (
        "workers serve different releases: this one stub-other@0.0.2, others stub-ensemble@0.0.1"
        in caplog.text
    )
    with session_scope(url) as s:
        assert set(repo.recent_releases(s)) == {"stub-ensemble@0.0.1", "stub-other@0.0.2"}
        assert set(repo.recent_releases(s, last=1)) == {"stub-other@0.0.2"}  # the newest prediction
    metrics = Metrics()
    metrics.attach(get_settings(), get_sessionmaker(url))
    scraped = generate_latest(metrics.registry).decode()
    assert 'drscreen_recent_release_predictions{version="stub-other@0.0.2"}' in scraped
    assert 'drscreen_recent_release_predictions{version="stub-ensemble@0.0.1"}' in scraped
    # a release retired long ago, still among the newest 1000 predictions of a small clinic: no
    # ERROR (the review: it fired every 5 minutes for days after an upgrade)
    with session_scope(url) as s:
        s.execute(update(Prediction).values(created_at=datetime.now(UTC) - timedelta(days=7)))
    [third] = add_images(url, store, "P-MIX2", [photo("17_left.jpg")])
    monkeypatch.setattr(scoring, "_release_checked_at", [float("-inf")])
    caplog.clear()
    with caplog.at_level("ERROR"):
        scoring.score_images([third], ensemble=other, store=store, db_url=url, enqueue=sent)
    assert "different releases" not in caplog.text

    # a proper upgrade: the new release activated, its workers grading; the old release's grades
    # of minutes ago were written before the switch (the operator walkthrough: a false ERROR)
    with session_scope(url) as s:
        s.execute(update(Prediction).values(created_at=datetime.now(UTC) - timedelta(minutes=2)))
        repo.activate_release(s, other.ref)
    [fourth] = add_images(url, store, "P-MIX3", [photo("17_right.jpg")])
    monkeypatch.setattr(scoring, "_release_checked_at", [float("-inf")])
    with caplog.at_level("ERROR"):
        scoring.score_images([fourth], ensemble=other, store=store, db_url=url, enqueue=sent)
    assert "different releases" not in caplog.text


def test_a_worker_not_serving_the_active_release_leaves_the_photographs_queued(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent, caplog: pytest.LogCaptureFixture
) -> None:
    """`drscreen model activate` names the one release the deployment serves: a worker still on
    another claims nothing (a patient's result must come from one release)."""
    [image_id] = add_images(url, store, "P-ACTIVE", [photo("16_left.jpg")])
    with session_scope(url) as s:
        repo.activate_release(s, "stub-other@0.0.2")
    with caplog.at_level("ERROR"):
        summary = scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert summary.other_release == [image_id] and not summary.scored and ens.batches == []
    assert (
        "active release is stub-other@0.0.2" in caplog.text
        and "DRSCREEN_MODEL=stub-other@0.0.2" in caplog.text
    )
    with session_scope(url) as s:
        row = repo.get_image(s, image_id)
        assert row is not None and row.status == "queued" and row.attempts == 0
    # Its message is gone: a sweep sends it at once, but only once a worker of the active release
    # is live (it waited the staleness limit, 15-20 minutes after an upgrade: the operator walkthrough)
    from workers.heartbeat import Heartbeat
    from workers.sweep import sweep

    resent = Sent()
    assert sweep(db_url=url, enqueue=resent).declined == [] and resent == []  # only the old release runs
    new_worker = Heartbeat("celery@new", started_at=utcnow(), concurrency=1, interval_s=60.0, db_url=url)
    new_worker.static["release"] = "stub-other@0.0.2"
    assert new_worker.beat(first=True)
    assert sweep(db_url=url, enqueue=resent).declined == [image_id]
    assert [args[0] for _, args, _ in resent] == [[image_id]]
    assert sweep(db_url=url, enqueue=Sent()).declined == []  # sent once, not at every sweep
    with session_scope(url) as s:
        repo.activate_release(s, ens.ref)  # the operator switches back
    with session_scope(url) as s:
        assert repo.active_release(s) == ens.ref
    assert scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=sent).scored == [
        image_id
    ]


def test_an_activation_while_a_batch_is_graded_writes_nothing_of_the_old_release(
    url: str,
    store: FileStore,
    ens: StubEnsemble,
    sent: Sent,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The release was checked only before the claim: `drscreen model activate` during the seconds
    a batch is graded let the old release write its grades (and the patient's result) after the
    switch. The write checks again: nothing written, the photographs queued again, untried."""
    ids = add_images(url, store, "P-SWITCH", [photo("16_left.jpg"), photo("16_right.jpg")])
    compute = scoring._compute

    def activated_meanwhile(*args: Any, **kwargs: Any) -> None:
        compute(*args, **kwargs)
        with session_scope(url) as s:
            repo.activate_release(s, "stub-next@0.0.3")

    monkeypatch.setattr(scoring, "_compute", activated_meanwhile)
    with caplog.at_level("ERROR"):
        summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
    assert ens.batches, "the batch was graded"
    assert sorted(summary.other_release) == sorted(ids) and not summary.scored and not summary.patients
    assert "release stub-next@0.0.3 was activated" in caplog.text
    with session_scope(url) as s:
        for image_id in ids:
            row = repo.get_image(s, image_id)
            assert row is not None and (row.status, row.attempts) == ("queued", 0)
            assert row.claimed_by == repo.LEFT_FOR_ACTIVE_RELEASE  # for the sweep, once its worker is live
        assert s.scalar(select(func.count()).select_from(Prediction)) == 0
        assert s.scalar(select(func.count()).select_from(PatientResult)) == 0
    assert sent == [], "no heatmap or rescore sent for grades not written"


def _queued_messages() -> list[dict[str, Any]]:
    """The messages waiting in this test's embedded broker (its own DRSCREEN_VAR_DIR)."""
    import base64
    import json

    from core.settings import get_settings

    folder = get_settings().broker_dir / "queue"
    out = []
    for path in sorted(folder.glob("*.msg")) if folder.is_dir() else []:
        message = json.loads(path.read_text())
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"headers": message["headers"], "args": args, "kwargs": kwargs})
    return out


def test_with_the_sweep_off_a_photograph_missing_from_the_store_is_sent_again_later(
    url: str, store: FileStore, ens: StubEnsemble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 18's leftover: a photograph missing from the worker's store went back to the queue
    for the sweep, and with DRSCREEN_SWEEP_INTERVAL_S=0 nothing sent it again: queued for ever.
    The task now sends it itself, after the sweep's own wait, and the attempts still end it."""
    from workers.settings import WorkerSettings

    elsewhere = FileStore(tmp_path / "another-machines-store")
    [image_id] = add_images(url, store, "P-NOSWEEP", [photo("16_left.jpg")])
    # the sweep on (the default): it re-sends, the task publishes nothing
    summary = scoring.score_images([image_id], ensemble=ens, store=elsewhere, db_url=url)
    assert summary.missing == [image_id] and _queued_messages() == []

    settings = WorkerSettings(sweep_interval_s=0, stale_queued_minutes=2, max_attempts=3)
    monkeypatch.setattr(scoring, "get_worker_settings", lambda: settings)
    before = datetime.now(UTC)
    summary = scoring.score_images([image_id], explain=False, ensemble=ens, store=elsewhere, db_url=url)
    assert summary.missing == [image_id]
    [message] = _queued_messages()
    assert message["headers"]["task"] == tasks.SCORE_IMAGES
    assert message["args"] == [[image_id]] and message["kwargs"] == {"explain": False}
    eta = datetime.fromisoformat(message["headers"]["eta"])
    assert timedelta(seconds=115) < eta - before < timedelta(seconds=125)  # stale_queued_minutes
    # the third attempt is the last: failed, nothing sent again
    summary = scoring.score_images([image_id], ensemble=ens, store=elsewhere, db_url=url)
    assert summary.failed == [image_id] and len(_queued_messages()) == 1


def test_a_fault_of_the_damage_check_leaves_the_quality_gates_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The review: an exception in the heuristic (e.g. MemoryError on a long strip) failed a
    photograph the quality gate had passed."""
    from ml.quality import QualityReport

    def broken(data: bytes) -> bool:
        raise MemoryError

    monkeypatch.setattr(scoring, "looks_block_shifted", broken)
    passed = QualityReport(gradable=True, scores={"focus": 1.0})
    assert scoring.with_damage_check(passed, photo("16_left.jpg")[1]) is passed


def test_a_photograph_another_worker_finished_meanwhile_is_not_written_again(
    url: str, store: FileStore, ens: StubEnsemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write-time check of two workers holding the same photograph (a message delivered twice):
    the one that writes second finds it done and writes nothing (the test review: removing the
    check changed no test)."""
    [image_id] = add_images(url, store, "TWICE", [photo("16_left.jpg")])
    real_write = scoring._write

    def other_worker_first(items: Any, *args: Any, **kwargs: Any) -> Any:
        with session_scope(url) as s:  # the other delivery's commit lands while this one graded
            s.execute(update(Image).where(Image.id == image_id).values(status="done", gradable=True))
        return real_write(items, *args, **kwargs)

    monkeypatch.setattr(scoring, "_write", other_worker_first)
    summary = scoring.score_images([image_id], ensemble=ens, store=store, db_url=url, enqueue=Sent())
    assert summary.skipped == [image_id] and summary.scored == []
    assert count(url, Prediction) == 0 and count(url, PatientResult) == 0


class _ProcessDied(BaseException):
    """Stands in for the worker process dying mid-task (kill -9, a native crash, the OOM killer):
    nothing after it runs, the claimed rows stay ``running``, the message is delivered again."""


def test_a_photograph_that_kills_the_worker_fails_alone_and_its_patient_is_referred(
    url: str, store: FileStore, ens: StubEnsemble, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault review: attempts were counted per task, so one photograph that crashed the
    process five times (or five worker kills) failed all 20 of a folder job's batch, and their
    patients read "not graded yet" for ever (the give-up path recomputed no patient)."""
    ids = [
        add_images(url, store, f"P{i}", [photo(name)])[0]
        for i, name in enumerate(
            ["16_left.jpg", "16_right.jpg", "19_left.jpg", "19_right.jpg", "178_left.jpg"]
        )
    ]
    culprit = ids[2]
    with session_scope(url) as s:
        culprit_path = repo.get_image(s, culprit).stored_path  # type: ignore[union-attr]
    read_bytes = store.read_bytes

    def dies_reading_the_culprit(relpath: str) -> bytes:  # as a decoder crash would, mid-task
        if relpath == culprit_path:
            raise _ProcessDied
        return read_bytes(relpath)

    monkeypatch.setattr(store, "read_bytes", dies_reading_the_culprit)
    max_attempts = scoring.get_worker_settings().max_attempts
    deliveries = 0
    while True:  # the same message, delivered again after each death (acks_late)
        deliveries += 1
        assert deliveries <= max_attempts + 2, "the task never completed"
        try:
            summary = scoring.score_images(ids, ensemble=ens, store=store, db_url=url, enqueue=sent)
            break
        except _ProcessDied:
            continue
    assert deliveries == max_attempts + 1 and summary.failed == [culprit]
    with session_scope(url) as s:
        rows = {i: repo.get_image(s, i) for i in ids}
        assert all(r is not None for r in rows.values())
        assert {i: r.status for i, r in rows.items() if r is not None} == {
            i: "failed" if i == culprit else "done" for i in ids
        }
        # the others were graded at their second claim at the latest, not held hostage
        assert max(r.attempts for i, r in rows.items() if r is not None and i != culprit) <= 2
        bad = rows[culprit]
        assert bad is not None and bad.error == f"scoring did not complete after {max_attempts} attempts"
        result = repo.get_current_patient_result(s, bad.patient_id)
        assert result is not None and result.referable and not result.gradable  # referred, not "pending"
