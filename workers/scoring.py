"""Score photographs: the plain function behind ``scoring.score_images`` (and ``drscreen score``).

One call handles a batch of image ids in three steps:

1. **claim** (short transaction, committed): the status guard ``repository.claim_image`` moves each
   image to ``running``; ids already ``done`` are skipped, so a redelivered task does nothing.
   Committing here makes ``running`` visible to clients and to the sweep (a worker that dies now
   leaves ``running`` rows, claimed in its node name, that the sweep re-queues).
2. **compute** (no transaction open): read, decode, quality gate (on a helper thread, running
   ahead) and ``ensemble.predict`` over the gradable photographs in batches of
   ``PREDICT_BATCH``. Holding no database transaction during inference keeps SQLite writers
   (the API) unblocked and PostgreSQL free of long idle-in-transaction sessions.
3. **write** (one transaction for the whole batch): predictions (upserts unique on image and model
   version), image status, job items, the patients' aggregates, bundle and job counts. Rows another
   delivery finished meanwhile are skipped, so no duplicate history row is written. The same
   patients' photographs that an earlier release scored are queued again for this one (a
   patient's result comes from one release) and sent as one more task after the commit.

Heatmaps: where the ensemble draws them from the grading forward pass itself (ONNX Runtime and
OpenVINO: the graphs output the feature map too), step 2 draws and stores each wanted one and step
3 records it in the same transaction as the grade, so a result and its heatmap appear together.
Otherwise (PyTorch's autograd Grad-CAM, or a drawing that failed) the heatmap is enqueued on the
explain queue only after that commit (the row must exist before the message).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from itertools import islice
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import producer, retention, tasks
from core import repository as repo
from core.aggregation import is_referable
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore, StoredFile, get_store
from core.tables import Image, ScoringJob, ScoringJobItem, as_utc, utcnow
from ml.imageio import ImageDecodeError, decode_scaled, sniff_format
from ml.jpeg_damage import looks_block_shifted
from ml.quality import DECODE_MIN_SIDE, QualityReport, assess_quality
from workers.model import EnsembleLike, get_ensemble, quality_thresholds
from workers.settings import get_worker_settings

log = logging.getLogger(__name__)

#: ``enqueue(task_name, args, kwargs)``; the default publishes through ``core.producer``.
Enqueue = Callable[[str, list[Any], dict[str, Any]], None]


def send_by_name(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    producer.send(name, args, kwargs)


#: Longest delay before a photograph missing from the store is sent again by its own task: a
#: message waiting for its ETA is held unacknowledged by a worker, and Redis hands it to a second
#: worker after its visibility timeout (1 h, core.celery_config).
MISSING_RESEND_MAX_S = 30 * 60


def _nothing_else_resends(enqueue: Enqueue | None) -> bool:
    """The sweep is off and this task publishes for real (an injected ``enqueue``, in embedded
    runs and tests, publishes nothing later): photographs given back must be re-sent by it."""
    return enqueue is None and get_worker_settings().sweep_interval_s == 0


def _send_again_later(image_ids: list[str], explain: bool | None, why: str) -> None:
    """With the sweep off (``DRSCREEN_SWEEP_INTERVAL_S=0``) nothing else sends a photograph this
    worker gave back to the queue, and it stayed ``queued`` for ever (session 18's review: a
    missing stored file; session 20's: a release activated meanwhile). Sent again after
    ``DRSCREEN_STALE_QUEUED_MINUTES`` (what the sweep would wait), to whichever worker takes it;
    a missing file's claims count attempts, so it ends at ``DRSCREEN_MAX_ATTEMPTS``, failed."""
    delay = min(get_worker_settings().stale_queued_minutes * 60, MISSING_RESEND_MAX_S)
    kwargs: dict[str, Any] = {} if explain is None else {"explain": explain}
    producer.send(tasks.SCORE_IMAGES, [list(image_ids)], kwargs, countdown=delay)
    log.info("%d photograph(s) %s: sent again in %.0f s", len(image_ids), why, delay)


@dataclass
class _Claimed:
    image_id: str
    patient_id: int
    stored_path: str
    bundle_id: str | None
    job_id: str | None
    job_explain: bool = False  # the folder job's own `explain` option (None of a job: False)
    rgb: np.ndarray | None = None  # dropped once graded (a clinic photograph can be ~36 MB)
    size: tuple[int, int] | None = None  # (height, width), kept for the image row
    quality: QualityReport | None = None
    error: str | None = None
    # the stored file is not in this worker's store: the deployment's fault, not the photograph's
    missing: bool = False
    prediction: Any = None
    wants_heatmap: bool = False
    heatmap: StoredFile | None = None  # drawn with the grade (see the module docstring)


@dataclass
class ScoreSummary:
    """What one call did (for logs, the CLI and tests)."""

    scored: list[str] = field(default_factory=list)  # done and gradable
    ungradable: list[str] = field(default_factory=list)  # done, not gradable
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unknown, already done, or taken by another
    patients: list[int] = field(default_factory=list)  # patients whose aggregate was recomputed
    explained: list[str] = field(default_factory=list)  # heatmap drawn and recorded with the grade
    explain_sent: list[str] = field(default_factory=list)  # heatmap left to the explain queue
    # the same patients' images an earlier release scored, queued again for this one
    rescore: list[str] = field(default_factory=list)
    # stored photograph not found: left queued for another attempt (the sweep sends it again, or
    # this task after a delay when the sweep is off)
    missing: list[str] = field(default_factory=list)
    # not claimed: this worker does not serve the deployment's active release
    other_release: list[str] = field(default_factory=list)


def _unique(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in ids))


def _sync_job_items(session: Session, image_ids: Sequence[str], status: str, error: str | None) -> None:
    """Carry an image's outcome to the folder-job items that point at it, so per-file results read
    their reason from one place. (A single UPDATE; core.repository has no by-image variant.)"""
    if not image_ids:
        return
    session.execute(
        update(ScoringJobItem)
        .where(ScoringJobItem.image_id.in_(list(image_ids)))
        .values(status=status, error=error[:4000] if error else None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _rounds(ids: list[str], db_url: str | None) -> list[list[str]]:
    """The task's photographs as claim-grade-write rounds: one round of all of them, except that
    those an earlier claim did not finish (``attempts`` > 0, not done: the process died while
    grading them, or a database outage cut the write) go first, one per round. A photograph that
    crashes the process then uses up its own attempts alone: claimed with the whole task, one such
    photograph (or five worker kills) failed every photograph of it (the fault review: 20 of 20
    of a folder job's batch, their patients "not graded yet" for ever)."""
    with session_scope(db_url) as session:
        retried = set(
            session.scalars(
                select(Image.id).where(Image.id.in_(ids), Image.attempts > 0, Image.status != "done")
            )
        )
    fresh = [i for i in ids if i not in retried]
    return [[i] for i in ids if i in retried] + ([fresh] if fresh else [])


def _claim(
    image_ids: Sequence[str], db_url: str | None, summary: ScoreSummary, worker: str | None
) -> list[_Claimed]:
    max_attempts = get_worker_settings().max_attempts
    claimed: list[_Claimed] = []
    with session_scope(db_url) as session:
        for image_id in image_ids:
            row = repo.claim_image(session, image_id, worker)
            if row is None:
                summary.skipped.append(image_id)
                continue
            item = _Claimed(row.id, row.patient_id, row.stored_path, row.bundle_id, row.job_id)
            if row.job_id is not None:
                job = session.get(ScoringJob, row.job_id)
                item.job_explain = bool(job is not None and job.explain)
            if row.attempts > max_attempts:
                # Its earlier attempts never finished (e.g. the photo crashed the process): failed
                # rather than fed to workers forever, by _write, which also recomputes its patient
                # (an ungradable eye, referred; the fault review: "not graded yet" for ever)
                item.error = f"scoring did not complete after {max_attempts} attempts"
            claimed.append(item)
        _refresh_groups(session, [], claimed)
    if summary.skipped:  # after the claims' commit: their locks are not held while it reads
        with session_scope(db_url) as session:
            _warn_unknown(session, summary.skipped)
    return claimed


#: How long ago an erasure may have been and still explain a message naming photographs this
#: database lacks: a queued message normally waits minutes (a day covers workers down overnight).
ERASURE_EXPLAINS_FOR = timedelta(days=1)


def _warn_unknown(session: Session, skipped: Sequence[str]) -> None:
    """Skipped ids are normally done already or taken by another worker. Ids this database lacks
    have two causes: the photograph was erased (``drscreen data erase --force``, a purge, or an
    erasure after a duplicate delivery) while its message waited, which is expected and said at
    INFO when this database recorded an erasure lately; or this worker reads another database
    than the API that queued them (the operator review: the task "succeeded" and the photograph
    stayed queued, silently), warned about, naming both causes."""
    known = set(session.scalars(select(Image.id).where(Image.id.in_(list(skipped)))))
    unknown = [i for i in skipped if i not in known]
    if not unknown:
        return
    erased_at = retention.erased_since(session, utcnow() - ERASURE_EXPLAINS_FOR)
    if erased_at is not None:
        log.info(
            "%d queued photograph id(s) unknown to this worker's database (e.g. %s): erased meanwhile? "
            "(an erasure or purge was recorded at %s)",
            len(unknown),
            unknown[0],
            as_utc(erased_at).isoformat(timespec="seconds"),
        )
        return
    log.warning(
        "%d queued photograph id(s) unknown to this worker's database (e.g. %s), and no erasure or "
        "purge recorded in it in the last %d h: is DRSCREEN_DATABASE_URL the API's? (or they were "
        "erased longer ago, while their message waited)",
        len(unknown),
        unknown[0],
        ERASURE_EXPLAINS_FOR // timedelta(hours=1),
    )


def _refresh_groups(session: Session, rows: Sequence[Image], claimed: Sequence[_Claimed]) -> None:
    bundles = {r.bundle_id for r in rows if r.bundle_id} | {c.bundle_id for c in claimed if c.bundle_id}
    jobs = {r.job_id for r in rows if r.job_id} | {c.job_id for c in claimed if c.job_id}
    # and every job that links them: a folder job sending a photograph again links the existing
    # image (its job_id stays the first job's), and that job stayed "running" until someone read it
    ids = [r.id for r in rows] + [c.image_id for c in claimed]
    if ids:
        linked = select(ScoringJobItem.job_id).where(ScoringJobItem.image_id.in_(ids)).distinct()
        jobs |= set(session.scalars(linked))
    for bundle_id in sorted(bundles):
        repo.refresh_bundle_status(session, bundle_id)
    for job_id in sorted(jobs):
        repo.refresh_job_counts(session, job_id)


#: Photographs per ``ensemble.predict`` call inside a task: the next ones are read, decoded and
#: quality-checked on a helper thread while these are graded (ONNX Runtime and OpenCV release the
#: GIL), so the CPU-side work hides behind inference instead of adding to it (docs/performance.md).
PREDICT_BATCH = 8


def _prepare(it: _Claimed, store: FileStore, max_pixels: int, thresholds: Any) -> _Claimed:
    """Read, decode and quality-check one photograph (fills rgb/quality/error in place)."""
    if it.error is not None:  # given up before it was read (_claim)
        return it
    try:
        data = store.read_bytes(it.stored_path)
    except FileNotFoundError:
        # The API stored it, so this worker does not see the API's store (DRSCREEN_STORE_DIR not
        # the shared folder, a mount gone): retried, not judged; the path stays in the server log.
        log.error(
            "image %s: stored photograph %s is not in this worker's file store %s; is "
            "DRSCREEN_STORE_DIR the folder the API writes to (shared between machines)?",
            it.image_id,
            it.stored_path,
            store.root,
        )
        it.missing = True
        return it
    except ValueError:
        it.error = "stored photograph path is outside the file store"
        return it
    try:
        it.rgb, it.size = decode_scaled(data, max_pixels=max_pixels, min_side=DECODE_MIN_SIDE)
    except ImageDecodeError as exc:
        it.error = f"{exc.reason}: {exc.detail}"
        return it
    try:
        it.quality = with_damage_check(assess_quality(it.rgb, thresholds), data)
    except Exception as exc:  # a gate bug on one odd photo must not sink the batch
        log.exception("quality gate failed on image %s", it.image_id)
        it.error = f"quality check failed: {exc}"
    if it.error is not None or it.quality is None:
        it.rgb = None  # nothing more to do with the pixels
    # an ungradable photograph is still run through the ensemble: the contract's result has 5
    # probabilities whenever an image is done; its grade stays null and nothing counts it
    return it


def with_damage_check(report: QualityReport, data: bytes) -> QualityReport:
    """A gradable JPEG whose blocks look shifted from one place on (scan data damaged, and the decoder
    fell back into step without a warning: ``ml.jpeg_damage``) is ungradable, reason
    ``damaged_jpeg``, so referred. A heuristic, so not a refusal at the edge: a false alarm (5 of
    the 5,778 equalised photographs, none of the 460 natural ones) costs one photograph's grade,
    not the upload."""
    if not report.gradable or sniff_format(data) != "jpeg":
        return report
    try:
        shifted = looks_block_shifted(data)
    except Exception:  # a fault of the heuristic must not fail a photograph the gate passed
        log.exception("the JPEG damage check failed; the quality gate's verdict stands")
        return report
    return replace(report, gradable=False, reasons=[*report.reasons, "damaged_jpeg"]) if shifted else report


def _gradable(it: _Claimed) -> bool:
    return it.quality is not None and it.quality.gradable


def _store_heatmap(it: _Claimed, heat: np.ndarray, store: FileStore) -> StoredFile | None:
    """The heatmap over the photograph, stored as PNG; None (the explain queue draws it) on failure."""
    from ml.inference.overlay import overlay_png  # ml.inference stays out of the Celery parent

    try:
        assert it.rgb is not None
        return store.put_bytes(overlay_png(it.rgb, heat), "png")
    except Exception:
        log.exception("drawing the heatmap of image %s failed; left to the explain queue", it.image_id)
        return None


def _predict(batch: list[_Claimed], ens: EnsembleLike, store: FileStore) -> None:
    try:
        images = [it.rgb for it in batch if it.rgb is not None]  # all of them: every decoded one
        preds = ens.predict(images, heatmaps=[it.wants_heatmap and _gradable(it) for it in batch])
    except Exception as exc:
        # Not a property of one photo: fail these visibly rather than leave them ``running``.
        log.exception("ensemble %s failed on a batch of %d", ens.ref, len(batch))
        for it in batch:
            it.error = f"scoring failed: {type(exc).__name__}: {exc}"
        return
    for it, pred in zip(batch, preds, strict=True):
        it.prediction = pred
        if pred.heatmap is not None:
            it.heatmap = _store_heatmap(it, pred.heatmap, store)
            pred.heatmap = None  # stored: the task holds no pixels past this point
        it.rgb = None  # graded: only the prediction is written


def _compute(items: list[_Claimed], ens: EnsembleLike, store: FileStore) -> None:
    """Fill size/quality/error/prediction in place. A bad photo fails alone, not the batch."""
    max_pixels = get_settings().max_image_pixels
    thresholds = quality_thresholds(ens)
    batch: list[_Claimed] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drscreen-prepare") as pool:
        # The helper thread runs at most PREDICT_BATCH photographs ahead while this one grades
        # the previous batch (pool.map would decode the whole task's photographs at once).
        todo = iter(items)
        ahead = deque(
            pool.submit(_prepare, c, store, max_pixels, thresholds) for c in islice(todo, PREDICT_BATCH)
        )
        while ahead:
            it = ahead.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(_prepare, nxt, store, max_pixels, thresholds))
            if it.error is None and it.quality is not None:
                batch.append(it)
            if len(batch) >= PREDICT_BATCH:
                _predict(batch, ens, store)
                batch = []
    if batch:
        _predict(batch, ens, store)


def _trigger(it: _Claimed) -> str:
    if it.bundle_id:
        return f"bundle:{it.bundle_id}"
    if it.job_id:
        return f"job:{it.job_id}"
    return f"image:{it.image_id}"


def _give_back(
    session: Session,
    items: list[_Claimed],
    locked: dict[str, Image],
    ref: str,
    active: str,
    summary: ScoreSummary,
) -> None:
    """The batch was graded by a release that is no longer the active one: nothing is written,
    and the photographs go back to the queue for a worker serving ``active``."""
    log.error(
        "release %s was activated while this worker graded %d photograph(s) with %s: they are "
        "queued again for a worker serving it; restart this one with DRSCREEN_MODEL=%s",
        active,
        len(items),
        ref,
        active,
    )
    for it in items:
        row = locked.get(it.image_id)
        if row is not None and row.status == "running":
            repo.return_to_queue(session, row, count_attempt=False)
            summary.other_release.append(row.id)
    repo.leave_for_active_release(session, summary.other_release)
    _refresh_groups(session, [locked[it.image_id] for it in items if it.image_id in locked], [])


def _write(
    items: list[_Claimed], ens: EnsembleLike, db_url: str | None, summary: ScoreSummary
) -> list[_Claimed]:
    """Persist the batch in one transaction; returns the items actually written."""
    written: list[_Claimed] = []
    max_attempts = get_worker_settings().max_attempts
    with session_scope(db_url) as session:
        # First, and a write (INSERT ... ON CONFLICT DO NOTHING): on SQLite, which ignores the row
        # locks below, it takes the database's write lock, so the status guard and the patients'
        # photographs are read under it (tests/unit/test_sqlite_writers_serialised.py)
        mv = repo.get_or_create_model_version(session, ens.ref, ens.card)
        # checked again here: an activation while the batch was graded would otherwise mix
        # releases in patients' results; the lock makes an activation wait for this commit
        active = repo.lock_release_for_writing(session, mv)
        # Row locks on PostgreSQL, all in one statement and in id order: a concurrent delivery
        # of the same ids waits here, then sees ``done`` and skips (SQLite serialises writers).
        locked = {
            r.id: r
            for r in session.scalars(
                select(Image)
                .where(Image.id.in_([it.image_id for it in items]))
                .order_by(Image.id)
                .with_for_update()
            )
        }
        rows: list[Image] = []
        done_ids: list[str] = []
        if active is not None:
            _give_back(session, items, locked, ens.ref, active, summary)
            return written
        for it in items:
            row = locked.get(it.image_id)
            if row is None or row.status == "done":
                summary.skipped.append(it.image_id)
                continue
            if it.size is not None and (row.width is None or row.height is None):
                row.height, row.width = it.size
            if it.missing and row.attempts < max_attempts:
                repo.return_to_queue(session, row)
                summary.missing.append(row.id)
                rows.append(row)  # its bundle/job no longer "running" on its account
                continue
            if it.missing:
                it.error = (
                    f"the stored photograph was not found by the workers in {max_attempts} attempts "
                    "(a file-store problem of the server, not of the photograph: upload it again)"
                )
            if it.error is not None:
                repo.mark_image_failed(session, row, it.error)
                _sync_job_items(session, [row.id], "failed", it.error)
                summary.failed.append(row.id)
            else:
                assert it.quality is not None
                pred = it.prediction
                gradable = pred is not None and it.quality.gradable
                grade = int(pred.grade) if gradable else None
                repo.upsert_prediction(
                    session,
                    image_id=row.id,
                    model_version_id=mv.id,
                    grade=grade,
                    probabilities=list(pred.probabilities) if pred is not None else None,
                    members=dict(pred.members) if pred is not None else None,
                    referable=is_referable(grade),
                    gradable=gradable,
                )
                if gradable and it.heatmap is not None:
                    repo.upsert_explanation(
                        session,
                        image_id=row.id,
                        model_version_id=mv.id,
                        sha256=it.heatmap.sha256,
                        stored_path=it.heatmap.relpath,
                    )
                repo.mark_image_done(session, row, quality=it.quality.as_dict(), gradable=gradable)
                done_ids.append(row.id)
                (summary.scored if gradable else summary.ungradable).append(row.id)
            rows.append(row)
            written.append(it)
        _sync_job_items(session, done_ids, "done", None)  # one UPDATE for the batch
        # Aggregates: failed images count as ungradable for their eye, so recompute for them too.
        triggers: dict[int, str] = {}
        for it in written:
            triggers.setdefault(it.patient_id, _trigger(it))
        # before reading them: another worker writing the same patients commits first, and these
        # reads then see its grades (each used to count the other's photographs as ungradable)
        repo.lock_patients_for_result(session, list(triggers))
        for patient_id, trigger in triggers.items():
            # One patient, one release: the patient's photographs an earlier release scored are
            # scored again by this one (the aggregate reads one version's predictions only, so
            # they would otherwise count as ungradable in it).
            # Recorded at once all the same, with those photographs counted as ungradable (so
            # referable) until they are in: waiting would leave the previous release's result,
            # maybe "not referable", standing for as long as they take, or for good if they fail.
            for image in repo.images_to_rescore(session, patient_id, mv.id):
                repo.requeue_image(session, image)
                summary.rescore.append(image.id)
            repo.recompute_patient(
                session,
                patient_id,
                model_version_id=mv.id,
                grade_fn=ens.grade_from_probabilities,
                eye_grade_fn=ens.grade_eye,
                trigger=trigger,
            )
            summary.patients.append(patient_id)
        _refresh_groups(session, rows, [])
    return written


#: Seconds between a process's checks that the other workers serve the same release.
RELEASE_CHECK_INTERVAL_S = 300.0
_release_checked_at = [float("-inf")]


def _check_one_release(session: Session, ref: str) -> None:
    """Say loudly when other workers serve another release: a patient's result is computed by
    one release, so with two in use it flips with whichever worker scored last, and photographs
    the other release graded count for nothing in it (session 18's operator review: no warning
    anywhere). Throttled: a query every ``RELEASE_CHECK_INTERVAL_S`` per process."""
    now = time.monotonic()
    if now - _release_checked_at[0] < RELEASE_CHECK_INTERVAL_S:
        return
    _release_checked_at[0] = now
    # recent = written since the last check but one: a release retired days ago still holds some
    # of the newest 1000 predictions of a small clinic, and is no longer being served
    since = utcnow() - timedelta(seconds=2 * RELEASE_CHECK_INTERVAL_S)
    this = repo.get_model_version_by_ref(session, ref)
    if this is not None and this.activated_at is not None and repo.active_release(session) == ref:
        # grades written before this release was activated are the switch, not a second release
        # being served (the operator walkthrough: an error right after a proper upgrade)
        since = max(since, as_utc(this.activated_at))
    others = sorted(r for r, at in repo.recent_releases(session).items() if r != ref and as_utc(at) >= since)
    if others:
        log.error(
            "workers serve different releases: this one %s, others %s wrote recent predictions; set "
            "DRSCREEN_MODEL to one name@version on every worker (expected only while a rolling "
            "upgrade replaces the old workers)",
            ref,
            ", ".join(others),
        )


def _discard_unrecorded_heatmaps(
    claimed: Sequence[_Claimed], written: Sequence[_Claimed], store: FileStore, db_url: str | None
) -> None:
    """Heatmaps drawn for photographs whose rows were not written (erased meanwhile with
    ``drscreen data erase --force``, or finished by another delivery) would stay in the store with
    nothing pointing at them: removed unless some row references the same file."""
    done = {id(it) for it in written}
    paths = [it.heatmap.relpath for it in claimed if it.heatmap is not None and id(it) not in done]
    if paths:
        with session_scope(db_url) as session:
            retention.remove_unreferenced_files(session, store, paths)


def _wants_explanation(it: _Claimed, explain: bool | None) -> bool:
    if explain is not None:
        return explain
    # Folder jobs can hold thousands of photographs: heatmaps only when the job asks for them
    # (a job's photograph graded again by a newer release, sent without the option, lost its
    # heatmap: the session-30 review)
    return it.job_explain if it.job_id is not None else get_worker_settings().explain


def score_images(
    image_ids: Sequence[str],
    *,
    explain: bool | None = None,
    ensemble: EnsembleLike | None = None,
    store: FileStore | None = None,
    db_url: str | None = None,
    enqueue: Enqueue | None = None,
    worker: str | None = None,
) -> ScoreSummary:
    """Score a batch of images by id (idempotent; see the module docstring).

    ``explain``: True/False forces heatmaps on/off; None = on for single images and bundles when
    ``DRSCREEN_EXPLAIN`` is on (the default), off for folder-job images.
    ``enqueue`` publishes the tasks of heatmaps not drawn with the grade and of re-scores (default:
    by name through ``core.producer``).
    ``worker``: the Celery node name recorded on the claimed rows (see ``workers.sweep``).
    """
    summary = ScoreSummary()
    ids = _unique(image_ids)
    if not ids:
        return summary
    # The model first: if it cannot load, the task fails with nothing claimed (the photographs
    # stay ``queued`` for the sweep) instead of leaving them ``running`` under a live worker.
    ens = ensemble if ensemble is not None else get_ensemble()
    with session_scope(db_url) as session:  # diagnostics, apart from the write's transaction
        active = repo.other_active_release(session, ens.ref)
        _check_one_release(session, ens.ref)
    if active is not None:
        # Claimed by nobody: the sweep sends them again after stale_queued_minutes, and a worker
        # serving the active release grades them (one release per patient result).
        log.error(
            "this worker serves %s, but the deployment's active release is %s (drscreen model "
            "activate): %d photograph(s) left queued; restart it with DRSCREEN_MODEL=%s",
            ens.ref,
            active,
            len(ids),
            active,
        )
        summary.other_release.extend(ids)
        with session_scope(db_url) as session:
            repo.leave_for_active_release(session, ids)
        if _nothing_else_resends(enqueue):
            _send_again_later(ids, explain, "left for a worker serving the active release")
        return summary
    store = store if store is not None else get_store()
    written: list[_Claimed] = []
    claimed_any = False
    for round_ids in _rounds(ids, db_url):
        claimed = _claim(round_ids, db_url, summary, worker)
        if not claimed:
            continue
        claimed_any = True
        for it in claimed:
            it.wants_heatmap = _wants_explanation(it, explain)
        _compute(claimed, ens, store)
        done = _write(claimed, ens, db_url, summary)
        _discard_unrecorded_heatmaps(claimed, done, store, db_url)
        written += done
    if not claimed_any:
        log.info("score_images: nothing to do for %d id(s)", len(ids))
        return summary
    send = enqueue if enqueue is not None else send_by_name
    if summary.rescore:
        send(tasks.SCORE_IMAGES, [summary.rescore], {})
    for it in written:
        if it.prediction is None or not it.wants_heatmap or not _gradable(it):
            continue
        # the file checked once its row is committed: bytes already stored (the same photograph's
        # heatmap, of another patient) were not written again, and an erasure of theirs may have
        # removed them meanwhile (core.retention.remove_unreferenced_files); drawn again then
        if it.heatmap is not None and store.exists(it.heatmap.relpath):
            summary.explained.append(it.image_id)
        else:
            send(tasks.EXPLAIN_IMAGE, [it.image_id], {})
            summary.explain_sent.append(it.image_id)
    if _nothing_else_resends(enqueue):
        if summary.missing:
            _send_again_later(summary.missing, explain, "missing from the store")
        if summary.other_release:
            _send_again_later(summary.other_release, explain, "left for a worker serving the active release")
    log.info(
        "score_images: %d graded, %d ungradable, %d failed, %d skipped, %d photographs missing (%s)",
        len(summary.scored),
        len(summary.ungradable),
        len(summary.failed),
        len(summary.skipped),
        len(summary.missing),
        ens.ref,
    )
    return summary
