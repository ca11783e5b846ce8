"""``drscreen db palette-photographs``: the photographs graded before palette images were refused.

Since session 31 palette (indexed, at most 256 colours) images are refused at the edge: their
reduced colours lowered grades, every quality check passing (two of 15 referable photographs
graded 0). Photographs stored before keep their grades; this lists them, with their patients, for
a grader to look at again. It reads each stored file's header only.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PalettePhotograph:
    image_id: str
    clinic: str
    patient_id: str
    filename: str | None


def palette_photographs() -> tuple[list[PalettePhotograph], int]:
    """The stored photographs whose files are palette images, and how many files were missing."""
    from PIL import Image as PILImage
    from sqlalchemy import select

    from core.db import session_scope
    from core.settings import get_settings
    from core.store import FileStore
    from core.tables import Clinic, Image, Patient
    from ml.imageio import PALETTE_MODES  # the modes refused at the edge

    store = FileStore(get_settings().store_path)
    found: list[PalettePhotograph] = []
    missing = 0
    with session_scope() as session:
        rows = session.execute(
            select(Image.id, Clinic.name, Patient.external_id, Image.filename, Image.stored_path)
            .join(Patient, Patient.id == Image.patient_id)
            .join(Clinic, Clinic.id == Image.clinic_id)
            .order_by(Image.created_at, Image.id)
        ).yield_per(1000)
        for image_id, clinic, patient, filename, stored in rows:
            if not store.exists(stored):
                missing += 1
                continue
            try:
                with PILImage.open(store.path(stored)) as im:  # the header only
                    mode = im.mode
            except Exception:
                continue
            if mode in PALETTE_MODES:
                found.append(PalettePhotograph(image_id, clinic, patient, filename))
    return found, missing
