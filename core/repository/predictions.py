"""A model version's prediction for a photograph (one per image and version)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.orm import Session

from core.repository._sql import _insert, in_batches
from core.repository.releases import activated_version_id
from core.tables import Image, Prediction, utcnow


def graded_gradable(image: Image, prediction: Prediction | None, status: str | None = None) -> bool:
    """Whether ``image`` is gradable for ``prediction``, the grading shown or applied: that
    grading's own quality gate. ``image.gradable`` is the latest grading's verdict, which after a
    rollback (or beside another release's workers) is not the one shown (session 30's leftover).
    ``status``: the photograph's status as reported, when not its own (a finished job's row keeps
    its earlier grade, "done", while a newer release grades it again)."""
    if (status or image.status) != "done":
        return False
    if prediction is None:
        return bool(image.gradable)
    return bool(prediction.gradable)


def upsert_prediction(
    session: Session,
    *,
    image_id: str,
    model_version_id: int,
    grade: int | None,
    probabilities: Sequence[float] | None,
    members: dict[str, Any] | None,
    referable: bool,
    gradable: bool = True,
) -> Prediction:
    """Idempotent on (image, model version): a redelivered task overwrites with the same values."""
    values = {
        "grade": grade,
        "probabilities": [float(p) for p in probabilities] if probabilities is not None else None,
        "members": members,
        "referable": referable,
        "gradable": gradable,
    }
    stmt = _insert(session, Prediction).values(
        image_id=image_id, model_version_id=model_version_id, created_at=utcnow(), **values
    )
    stmt = stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_=values)
    session.execute(stmt)
    row = session.scalars(
        select(Prediction)
        .where(Prediction.image_id == image_id, Prediction.model_version_id == model_version_id)
        .execution_options(populate_existing=True)
    ).one()
    return row


def get_prediction(session: Session, image_id: str, model_version_id: int | None = None) -> Prediction | None:
    """The prediction for ``image_id`` by that model version; by default the one shown: the
    activated release's when it graded the photograph, else the newest (after a rollback, the newer
    release's grade stayed on the photograph while the patient's decision was the activated one's,
    and its heatmap was looked for in vain: the review of session 30)."""
    stmt = select(Prediction).where(Prediction.image_id == image_id)
    if model_version_id is not None:
        stmt = stmt.where(Prediction.model_version_id == model_version_id)
    return session.scalars(
        stmt.order_by(*_shown_last(session, model_version_id, descending=True)).limit(1)
    ).first()


def predictions_for_images(
    session: Session, image_ids: Sequence[str], model_version_id: int | None = None
) -> dict[str, Prediction]:
    """image id -> its prediction (that model version, or the one shown: see ``get_prediction``)."""
    if not image_ids:
        return {}
    order = _shown_last(session, model_version_id)
    out: dict[str, Prediction] = {}
    for batch in in_batches(image_ids):  # a photograph's predictions all fall in its batch
        stmt = select(Prediction).where(Prediction.image_id.in_(batch))
        if model_version_id is not None:
            stmt = stmt.where(Prediction.model_version_id == model_version_id)
        for row in session.scalars(stmt.order_by(*order)):
            out[row.image_id] = row  # the later row wins
    return out


def shown_first(session: Session) -> list[Any]:
    """ORDER BY terms that put the prediction shown for a photograph first among its predictions
    (``get_prediction``'s rule, for a window over several photographs' predictions in SQL)."""
    return _shown_last(session, None, descending=True)


def _shown_last(session: Session, model_version_id: int | None, descending: bool = False) -> list[Any]:
    """Predictions in the order that puts the one shown last: the activated release's (when no
    version is asked for and one was activated), then the newest (``descending``: first)."""
    activated = activated_version_id(session) if model_version_id is None else None
    order: list[Any] = [Prediction.id]
    if activated is not None:
        order.insert(0, case((Prediction.model_version_id == activated, 1), else_=0))
    return [o.desc() for o in order] if descending else order
