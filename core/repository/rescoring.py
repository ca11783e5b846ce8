"""Which finished photographs a release has to grade (again), and the ones a worker of
another release left for the active one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from core import heartbeat
from core.repository.heartbeats import worker_heartbeats
from core.repository.images import list_patient_images
from core.repository.patient_results import latest_visit
from core.repository.releases import active_release, get_model_version_by_ref
from core.settings import get_settings
from core.tables import Image, ModelVersion, Prediction

#: ``image.claimed_by`` of a queued photograph a worker of another release left for the active one.
LEFT_FOR_ACTIVE_RELEASE = "(left for the active release)"


def leave_for_active_release(session: Session, image_ids: Sequence[str]) -> None:
    """Mark queued photographs a worker serving another release did not grade (its message is
    gone): ``declined_to_resend`` hands them to the sweep as soon as a worker of the active release
    is live, instead of after the staleness limit (15-20 minutes after an upgrade: the operator
    walkthrough). ``updated_at`` is left alone (the queue-age figures read it)."""
    if image_ids:
        session.execute(
            update(Image)
            .where(Image.id.in_(list(image_ids)), Image.status == "queued")
            .values(claimed_by=LEFT_FOR_ACTIVE_RELEASE)
            .execution_options(synchronize_session="fetch")
        )


def declined_to_resend(session: Session, now: datetime) -> list[Image]:
    """The photographs ``leave_for_active_release`` marked, once a live worker serves the active
    release (none while only workers of other releases run: re-sending would only bounce)."""
    active = active_release(session)
    live = heartbeat.live_workers(worker_heartbeats(session), now)
    if active is None or not any(w.release == active for w in live):
        return []
    marked = and_(Image.status == "queued", Image.claimed_by == LEFT_FOR_ACTIVE_RELEASE)
    return list(session.scalars(select(Image).where(marked)))


def _scored_by(image_id: Any, version: ModelVersion, *, active: bool) -> Any:
    """EXISTS a prediction of the image that a patient's result by ``version`` may keep.

    ``version`` the activated release: by it exactly. Only its workers write
    (``lock_release_for_writing``), so whatever another release scored is graded again, whichever
    the database saw first (a switch back to a release seen earlier left the other release's
    photographs unscored by it, and the patient's result called them ungradable for good: the
    operator walkthrough). Otherwise by it or a release seen after it: while workers of two
    releases share a queue the older one leaves the newer one's grades alone, so nothing
    ping-pongs between them. Correlated on the image, so it reads the (image_id, model_version_id)
    unique index."""
    seen = Prediction.model_version_id
    by_it = seen == version.id if active else seen >= version.id
    return select(Prediction.id).where(Prediction.image_id == image_id, by_it).exists()


def images_to_rescore(
    session: Session, patient_id: int, model_version_id: int, visit_window: timedelta | None = None
) -> list[Image]:
    """The finished images of the patient's latest visit (``latest_visit``: the only one the
    patient's result reads) that the model version has to grade again (``_scored_by``). An earlier
    visit keeps its release's grades and its entry in the history."""
    if visit_window is None:
        visit_window = get_settings().visit_window
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        return []
    active = active_release(session) == version.ref
    visit = [im.id for im in latest_visit(list_patient_images(session, patient_id), visit_window)]
    return list(
        session.scalars(
            select(Image)
            .where(Image.id.in_(visit), Image.status == "done", ~_scored_by(Image.id, version, active=active))
            .order_by(Image.created_at)
        )
    )


def needs_rescoring(session: Session, image: Image, model_ref: str) -> bool:
    """A finished image that the model ``model_ref`` must grade again (``_scored_by``). A version
    the database has never seen counts as the newest."""
    if image.status != "done":
        return False
    # the release that will grade it: a folder job may be expanded by a worker of another one
    active = active_release(session)
    version = get_model_version_by_ref(session, active or model_ref)
    if version is None:
        return True
    return not session.scalar(select(_scored_by(image.id, version, active=active is not None)))
