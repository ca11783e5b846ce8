"""Bundles: the photographs of one patient uploaded together, and their combined status."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.tables import Bundle, Image


def create_bundle(session: Session, clinic_id: int, patient_id: int) -> Bundle:
    row = Bundle(clinic_id=clinic_id, patient_id=patient_id, status="queued")
    session.add(row)
    session.flush()
    return row


def get_bundle(session: Session, bundle_id: str, clinic_id: int | None = None) -> Bundle | None:
    row = session.get(Bundle, bundle_id)
    if row is None or (clinic_id is not None and row.clinic_id != clinic_id):
        return None
    return row


def bundle_images(session: Session, bundle_id: str) -> list[Image]:
    return list(
        session.scalars(
            select(Image).where(Image.bundle_id == bundle_id).order_by(Image.eye, Image.created_at)
        )
    )


def combined_status(statuses: Iterable[str]) -> str:
    """Status of a group of images: running while any is unfinished, failed when all failed."""
    statuses = list(statuses)
    if not statuses:
        return "queued"
    if all(s == "queued" for s in statuses):
        return "queued"
    if any(s in ("queued", "running") for s in statuses):
        return "running"
    if all(s == "failed" for s in statuses):
        return "failed"
    return "done"


def refresh_bundle_status(session: Session, bundle_id: str) -> Bundle:
    bundle = session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFound("bundle not found")
    bundle.status = combined_status(im.status for im in bundle_images(session, bundle_id))
    session.flush()
    return bundle
