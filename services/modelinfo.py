"""The released ensembles under ``models_dir``, read as plain JSON.

The API must not import ``ml.release`` (it imports torch); a release is data, so reading
``models/ensembles/<name>/<version>/manifest.json`` (checked against its ``SHA256SUMS`` with
``ml.publish``, the standard library only) is enough to describe it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from core.schemas import ModelInfo, ModelMember
from core.settings import Settings
from ml.publish import checked_sums, default_release
from ml.publish import is_candidate as publish_is_candidate

log = logging.getLogger(__name__)


#: Problems already logged: /readyz, every /metrics scrape and the model pages read the releases,
#: and one tampered release logged the same warning at each of them.
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def released_ensembles(models_dir: Path) -> dict[str, Path]:
    """``name@version`` -> its manifest path, for the releases whose manifest its SHA256SUMS still
    vouches for (an edited one: /readyz said `model: true` and /v1/models showed its figures while
    every worker refused it; the session-29 review)."""
    root = models_dir / "ensembles"
    if not root.is_dir():
        return {}
    found = {}
    for manifest in sorted(root.glob("*/*/manifest.json")):
        if not manifest.is_file():
            continue
        try:
            checked_sums(manifest.parent)  # the manifest only here: a few kB, read per request
        except (OSError, ValueError) as exc:
            _warn_once(f"release {manifest.parent} left out: {exc}")
            continue
        found[f"{manifest.parent.parent.name}@{manifest.parent.name}"] = manifest
    return found


def is_candidate(manifest: Path) -> bool:
    """An ensemble exported with ``--validation-only`` (no test figures): never the default model."""
    return publish_is_candidate(manifest.parent)


def activated_release(settings: Settings) -> str | None:
    """The release ``drscreen model activate`` pinned for the deployment (None: never, or the
    database cannot say now)."""
    from sqlalchemy.exc import SQLAlchemyError

    from core import repository as repo
    from core.db import session_scope

    try:
        with session_scope(settings.database_url) as session:
            return repo.active_release(session)
    except SQLAlchemyError:
        return None


def active_ref(settings: Settings) -> str | None:
    """What workers serve: the activated release (``drscreen model activate``) if there is one
    (None when this machine's models folder lacks it: /readyz then says so), else
    ``DRSCREEN_MODEL`` if that release exists, else ``ml.publish.default_release`` of the
    releases that are not candidates (as workers choose, ``ml.release.newest_ensemble``)."""
    found = released_ensembles(settings.models_dir)
    activated = activated_release(settings)
    if activated is not None:
        if activated not in found:
            log.warning("the deployment serves %s, which is not under %s", activated, settings.models_dir)
            return None
        return activated
    if settings.model:
        return settings.model if settings.model in found else None
    return default_release(ref for ref, manifest in found.items() if not is_candidate(manifest))


def read_manifest(settings: Settings, ref: str) -> dict[str, Any] | None:
    path = released_ensembles(settings.models_dir).get(ref)
    if path is None:
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("unreadable manifest %s", path, exc_info=True)
        return None
    return manifest


def model_info(settings: Settings) -> ModelInfo | None:
    ref = active_ref(settings)
    manifest = read_manifest(settings, ref) if ref else None
    if ref is None or manifest is None:
        return None
    card = manifest.get("card") or {}
    metrics = card.get("metrics") or {}
    members = []
    for entry in manifest.get("members", []):
        member_ref = entry["ref"] if isinstance(entry, dict) else str(entry)
        members.append(ModelMember(ref=member_ref, metrics=metrics.get(member_ref) or {}))
    chosen = card.get("chosen_rule")
    ensemble_metrics = metrics.get(f"rule:{chosen}") if chosen else None
    return ModelInfo(
        version=ref,
        members=members,
        metrics={
            # the card's name for the rule its figures are of ("equal_average" runs as a
            # weighted average with equal weights: the manifest's rule would contradict the card)
            "combination": chosen or (manifest.get("combination") or {}).get("rule"),
            **(ensemble_metrics or {}),
        },
    )
