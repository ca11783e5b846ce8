"""Writing a release folder: validated names, immutable versions, all-or-nothing.

A version, once written, is what workers and model cards refer to by ``name@version``; writing
another model under the same name would change what an ensemble's manifest names without
anything noticing (the session 17 audit re-exported a member under its version: the ensemble
still loaded it, and its test QWK fell from 0.36 to 0.16). So an existing version is refused
unless the caller forces it, and a release is built in a staging folder and renamed into place
only when every step has passed: a failed export leaves the previous release as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
VERSION: Final = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?")
STAGING: Final = ".staging"  # under the models folder: the same file system, so rename is atomic


class ReleaseError(ValueError):
    """A release cannot be written as asked (bad name or version, or the version exists)."""


def check_name_version(name: str, version: str) -> None:
    if not NAME.fullmatch(name) or ".." in name:
        raise ReleaseError(f"release name {name!r}: lower-case letters, digits, '.', '_', '-' (not '..')")
    if not VERSION.fullmatch(version):
        raise ReleaseError(f"release version {version!r}: MAJOR.MINOR.PATCH, e.g. 1.7.0")


#: Each release folder's checksums of the files that decide its grades, in ``sha256sum`` format
#: (``sha256sum -c SHA256SUMS`` checks a copy by hand). The metadata's weights sha256 covered the
#: weights only: an edited config.json (preprocessing, head) or manifest (cut points, weights)
#: changed every grade under the same version, silently (the release review, session 29).
SUMS_FILE: Final = "SHA256SUMS"
SUMMED: Final = ("config.json", "model.safetensors", "metadata.json", "manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(folder: Path) -> None:
    """Record the checksums of ``folder``'s files that decide its grades (:data:`SUMMED`)."""
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in SUMMED if (folder / name).is_file()]
    (folder / SUMS_FILE).write_text("".join(lines))


def checked_sums(folder: Path) -> dict[str, str]:
    """The files of ``folder`` its SHA256SUMS lists, by name, with their sha256 as checked; raises
    ValueError for a file that differs or is gone. ``{}`` for a release exported before the file
    existed (its weights are still checked against the metadata)."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    recorded = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name  # `sha256sum` text or binary mode
        if name not in SUMMED or len(digest) != 64:
            raise ValueError(f"{path}: unreadable line {line[:80]!r}")
        recorded[name] = digest
    for name, digest in recorded.items():
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name} is missing (listed in {SUMS_FILE})")
        if sha256_file(folder / name) != digest:
            raise ValueError(
                f"{folder / name} was changed after the release was exported (its sha256 differs "
                f"from {SUMS_FILE}): restore the release folder as shipped, or export a new version"
            )
    return recorded


#: The releases that ship with the product (the repository's models/ folder).
SHIPPED_DIR: Final = Path(__file__).resolve().parent.parent / "models"


def is_candidate(folder: Path) -> bool:
    """An ensemble exported with ``--validation-only``: a candidate, never a release (its test part
    was not read, so its model card has no test figures)."""
    try:
        return json.loads((folder / "manifest.json").read_text())["card"]["test"]["n_images"] == 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


#: The product's own ensemble: the default model whenever a release of it is installed.
PRODUCT_ENSEMBLE: Final = "drscreen-ensemble"


def version_key(version: str) -> tuple[tuple[int, ...], int, tuple[tuple[int, int, str], ...]]:
    """Order of release versions: by number, a pre-release (``1.7.0-rc.1``) below its release, a
    build suffix (``1.6.0+hotfix``) above it. Numbers alone tied ``1.6.0`` with ``1.6.0-hotfix``
    (the API and the workers then broke the tie differently) and put ``1.7.0-rc.1`` level with
    ``1.7.0``."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:([-+])(.*))?", version)
    if match is None:
        return ((), 0, ((1, 0, version),))  # not a release version: below every one
    numbers = tuple(int(part) for part in match.group(1, 2, 3))
    # the suffix's dot-separated parts: numbers as numbers (rc.10 after rc.2), below words
    parts = tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in (match.group(5) or "").split(".") if p
    )
    return (numbers, 0 if match.group(4) == "-" else 1, parts)


def default_release(releases: Iterable[str]) -> str | None:
    """The model served when none is named: the highest version of ``drscreen-ensemble`` among
    ``releases`` (``name@version``, candidates already left out), or, in a models folder without
    it (a deployment's own ensembles), the highest version of any name.

    The product's name comes first so that a development or experimental ensemble that happens
    to carry a higher number (``drscreen-dev@2.0.0``) is never served unless it is named."""
    refs = list(releases)
    product = [r for r in refs if r.partition("@")[0] == PRODUCT_ENSEMBLE]
    pool = product or refs
    return max(pool, key=lambda r: version_key(r.partition("@")[2])) if pool else None


def writable(models_dir: Path, kind: str, name: str, version: str, force: bool = False) -> Path:
    """``models_dir/<kind>/<name>/<version>`` after checking the name and that the version may be
    written (it does not exist, or ``force``); callers with costly work ask before doing it.

    ``force`` never replaces a release in the shipped models folder, except an ensemble candidate
    (``--validation-only``) being adopted: ``--force`` said "candidates only" and rewrote a
    shipped ensemble's thresholds under its own version all the same (the README walkthrough).
    Work on a copy of the folder (``DRSCREEN_MODELS_DIR``) to rebuild a shipped release."""
    check_name_version(name, version)
    dst = models_dir / kind / name / version
    if not dst.exists():
        return dst
    candidate = kind == "ensembles" and is_candidate(dst)
    shipped = dst.resolve().is_relative_to(SHIPPED_DIR) and not candidate
    if not force or shipped:
        raise ReleaseError(
            f"{kind[:-1]} {name}@{version} exists ({dst}): a released version is never rewritten; "
            + (
                "it ships with drscreen: rebuild it in a copy of the models folder (DRSCREEN_MODELS_DIR)"
                if force
                else "choose a new version (or --force for a candidate nothing ships)"
            )
        )
    return dst


@contextlib.contextmanager
def publishing(models_dir: Path, kind: str, name: str, version: str, force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder for ``models_dir/<kind>/<name>/<version>``; on a normal exit
    it becomes that folder (replacing it only with ``force``), on an exception it is removed."""
    dst = writable(models_dir, kind, name, version, force)
    staging_root = models_dir / STAGING
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{kind}-{name}-{version}-", dir=staging_root))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_sums(staging)
    dst.parent.mkdir(parents=True, exist_ok=True)
    replaced = None
    if dst.exists() and not force:  # another export of this version finished meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        raise ReleaseError(f"{kind[:-1]} {name}@{version} was written by another export meanwhile")
    if dst.exists():
        replaced = staging_root / f"replaced-{kind}-{name}-{version}-{os.getpid()}"
        dst.rename(replaced)
    staging.rename(dst)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging_root.rmdir()  # only when empty
