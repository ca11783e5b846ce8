"""Grad-CAM heatmaps: the plain function behind ``explain.explain_image``.

On the ONNX Runtime and OpenVINO paths ``scoring.score_images`` draws wanted heatmaps from the
grading forward pass itself; this task, on its own queue, draws the rest: PyTorch workers'
(autograd Grad-CAM), re-draws, and any the scoring step failed to draw. Idempotent: an
explanation already stored for (image, model version) is not drawn again, and the row is an upsert.
"""

from __future__ import annotations

import logging

from core import repository as repo
from core import retention
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore, get_store
from ml.imageio import ImageDecodeError, decode_scaled
from ml.quality import DECODE_MIN_SIDE
from workers.model import EnsembleLike, get_ensemble

log = logging.getLogger(__name__)


def explain_image(
    image_id: str,
    *,
    ensemble: EnsembleLike | None = None,
    store: FileStore | None = None,
    db_url: str | None = None,
    force: bool = False,
) -> str | None:
    """Draw, store and record the heatmap of one scored, gradable image.

    Returns the store-relative path of the PNG, or None when there is nothing to explain (unknown
    id, not scored yet, ungradable, unreadable photo).
    """
    ens = ensemble if ensemble is not None else get_ensemble()
    store = store if store is not None else get_store()
    with session_scope(db_url) as session:
        image = repo.get_image(session, image_id)
        graded = repo.get_prediction(session, image_id) if image is not None else None
        if image is None or not repo.graded_gradable(image, graded):
            log.info("explain_image: %s is not a scored gradable image; nothing to do", image_id)
            return None
        mv = repo.get_or_create_model_version(session, ens.ref, ens.card)
        if graded is not None and graded.model_version_id != mv.id:
            # another release's grade is shown: this release's map would explain a grade nobody
            # sees (and pages show the map of the grade shown only)
            log.info("explain_image: %s was graded by another release than %s; not drawn", image_id, ens.ref)
            return None
        existing = repo.get_explanation(session, image_id, mv.id)
        if (
            existing is not None
            and repo.on_current_scale(existing)
            and store.exists(existing.stored_path)
            and not force
        ):
            return existing.stored_path
        # a heatmap of an earlier colour scale is replaced; its file goes once nothing refers to it
        replaced = existing.stored_path if existing is not None else None
        stored_path, mv_id = image.stored_path, mv.id

    # Grad-CAM runs outside any transaction (it takes seconds with the full ensemble).
    try:
        data = store.read_bytes(stored_path)
        rgb, _ = decode_scaled(data, max_pixels=get_settings().max_image_pixels, min_side=DECODE_MIN_SIDE)
    except (FileNotFoundError, ImageDecodeError) as exc:
        log.warning("explain_image: cannot read the photograph of %s: %s", image_id, exc)
        return None
    # Imported here: ml.inference can pull in torch (PyTorch runtime), which the Celery parent must not load.
    from ml.inference.overlay import overlay_png

    png = overlay_png(rgb, ens.explain(rgb))
    stored = store.put_bytes(png, "png")

    with session_scope(db_url) as session:
        # an erasure (core.retention) of the patient either waits for this lock or is done already
        still_there = retention.lock_image(session, image_id)
        if still_there:
            repo.upsert_explanation(
                session,
                image_id=image_id,
                model_version_id=mv_id,
                sha256=stored.sha256,
                stored_path=stored.relpath,
            )
    if replaced is not None and replaced != stored.relpath:
        with session_scope(db_url) as session:
            retention.remove_unreferenced_files(session, store, [replaced])
    if not still_there:
        with session_scope(db_url) as session:  # its heatmap must not outlive it in the store
            retention.remove_unreferenced_files(session, store, [stored.relpath])
        log.info("explain_image: %s was erased while its heatmap was drawn; heatmap discarded", image_id)
        return None
    # the same bytes stored before (another patient's heatmap of the same photograph) were not
    # written again, and an erasure of theirs may have removed them before the row was committed
    store.put_bytes(png, "png")
    log.info("explain_image: %s -> %s", image_id, stored.relpath)
    return stored.relpath
