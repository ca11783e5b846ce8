"""A model version's explanation heatmap of a photograph (one per image and version)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.repository._sql import _insert
from core.repository.predictions import get_prediction
from core.tables import HEATMAP_SCALE, Explanation, utcnow


def upsert_explanation(
    session: Session, *, image_id: str, model_version_id: int, sha256: str, stored_path: str
) -> Explanation:
    values = {"sha256": sha256, "stored_path": stored_path, "scale": HEATMAP_SCALE}
    stmt = _insert(session, Explanation).values(
        image_id=image_id, model_version_id=model_version_id, created_at=utcnow(), **values
    )
    session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_=values))
    return session.scalars(
        select(Explanation)
        .where(Explanation.image_id == image_id, Explanation.model_version_id == model_version_id)
        .execution_options(populate_existing=True)
    ).one()


def get_explanation(
    session: Session, image_id: str, model_version_id: int | None = None
) -> Explanation | None:
    stmt = select(Explanation).where(Explanation.image_id == image_id)
    if model_version_id is not None:
        stmt = stmt.where(Explanation.model_version_id == model_version_id)
    return session.scalars(stmt.order_by(Explanation.id.desc()).limit(1)).first()


def current_explanation(session: Session, image_id: str) -> Explanation | None:
    """The heatmap of the grade shown for the photograph (``get_prediction``'s release), or
    None when that release has drawn none or found the photograph ungradable. Any release's newest
    heatmap was shown before: after a change of release, a photograph re-graded ungradable kept
    the old release's heatmap, and a re-graded one showed the old map beside the new grade.
    A heatmap drawn on an earlier colour scale is returned too (``scale`` says so: see
    ``on_current_scale``); hiding it left a photograph whose release no worker serves without any
    heatmap, "retry shortly" for ever (the review of the scale's migration)."""
    prediction = get_prediction(session, image_id)
    if prediction is None or not prediction.gradable:
        return None
    return get_explanation(session, image_id, prediction.model_version_id)


def on_current_scale(row: Explanation) -> bool:
    """Drawn on the one colour scale every heatmap shares since session 30 (``HEATMAP_SCALE``); an
    earlier one was stretched to its own photograph's peak, and is drawn again when looked at."""
    return row.scale == HEATMAP_SCALE
