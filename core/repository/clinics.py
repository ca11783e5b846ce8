"""Clinics: created by name, found by name, and the import folders each may read."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidInput
from core.repository._sql import _insert
from core.settings import Settings
from core.tables import Clinic, utcnow

#: The column width (core.tables) that PostgreSQL enforces and SQLite does not.
CLINIC_NAME_MAX = 200


def get_or_create_clinic(session: Session, name: str) -> Clinic:
    name = name.strip()
    if not name:
        raise InvalidInput("clinic name is empty")
    if len(name) > CLINIC_NAME_MAX:  # PostgreSQL refuses it with a traceback; SQLite stored it
        raise InvalidInput(f"clinic name is longer than {CLINIC_NAME_MAX} characters")
    stmt = _insert(session, Clinic).values(name=name, created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    clinic = session.scalars(select(Clinic).where(Clinic.name == name)).one()
    return clinic


def import_roots_of(session: Session, clinic_id: int, settings: Settings) -> list[Path]:
    """The import folders this clinic's folder jobs may read (``Settings.import_roots_for``)."""
    clinic = session.get(Clinic, clinic_id)
    return settings.import_roots_for(clinic.name) if clinic is not None else []


def get_clinic_by_name(session: Session, name: str) -> Clinic | None:
    """The clinic of that name, as `get_or_create_clinic` stored it (trimmed)."""
    return session.scalars(select(Clinic).where(Clinic.name == name.strip())).one_or_none()
