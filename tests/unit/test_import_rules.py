"""The one-way arrows of docs/interfaces.md, checked by walking every import (module level and
inside functions) of our packages:

    services -> core, ml.imageio, ml.publish;
    workers -> core, ml.inference, ml.quality, ml.imageio, ml.jpeg_damage;
    ml -> nothing of core/services/workers/cli;   ml.inference -> never ml.training;
    core -> no services/workers/ml/cli, no FastAPI, no torch;   migrations -> core only;
    cli -> anything (lazily: its module level imports no heavy package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("core", "services", "workers", "ml", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno, id(node) in top_level))
            # `from ml import training` imports ml.training
            found += [(f"{target}.{a.name}", node.lineno, id(node) in top_level) for a in node.names]
    return found


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _forbidden(module: str, imported: str) -> str | None:
    if _is(module, "core"):
        for bad in ("services", "workers", "ml", "cli", "fastapi", "starlette", "torch"):
            if _is(imported, bad):
                return f"core must not import {bad}"
    if _is(module, "services"):
        # ml.imageio (numpy + Pillow) validates uploads at the edge, ml.publish (the standard
        # library only) checks a release's SHA256SUMS; nothing else of ml (torch).
        light = ("ml.imageio", "ml.publish")
        if _is(imported, "ml") and imported != "ml" and not any(_is(imported, a) for a in light):
            return "services may use only ml.imageio and ml.publish of ml"
        for bad in ("workers", "cli", "torch"):
            if _is(imported, bad):
                return f"services must not import {bad}"
    if _is(module, "workers"):
        if _is(imported, "services") or _is(imported, "cli"):
            return "workers must not import services or cli"
        if _is(imported, "ml") and imported != "ml":
            allowed = ("ml.inference", "ml.quality", "ml.imageio", "ml.jpeg_damage")
            if not any(_is(imported, a) for a in allowed):
                return f"workers may use only {', '.join(allowed)} of ml"
    if _is(module, "ml"):
        for bad in ("core", "services", "workers", "cli"):
            if _is(imported, bad):
                return f"ml must not import {bad}"
        if _is(module, "ml.inference") and _is(imported, "ml.training"):
            return "ml.inference must not import ml.training"
    if _is(module, "migrations") and any(_is(imported, b) for b in ("services", "workers", "ml", "cli")):
        return "migrations import core only"
    return None


def _files() -> list[Path]:
    files: list[Path] = []
    for pkg in (*OURS, "migrations"):
        if (ROOT / pkg).is_dir():
            files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def test_arrows_point_one_way() -> None:
    problems = []
    for path in _files():
        module = _module_name(path)
        for imported, line, _ in _imports(path):
            why = _forbidden(module, imported)
            if why:
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {imported} ({why})")
    assert not problems, "\n".join(problems)


def test_cli_imports_heavy_parts_lazily() -> None:
    heavy = (
        "torch",
        "sqlalchemy",
        "celery",
        "fastapi",
        "uvicorn",
        "numpy",
        "core",
        "services",
        "workers",
        "ml",
    )
    problems = []
    for path in sorted((ROOT / "cli").rglob("*.py")):
        for imported, line, top in _imports(path):
            if top and any(_is(imported, h) for h in heavy):
                problems.append(f"{path.relative_to(ROOT)}:{line}: module-level import of {imported}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "imported", "bad"),
    [
        ("services.app", "workers.tasks", True),
        ("services.app", "core.repository", False),
        ("services.uploads", "ml.imageio", False),
        ("services.app", "ml.release", True),
        ("services.app", "ml.inference", True),
        ("workers.tasks", "ml.inference.ensemble", False),
        ("workers.tasks", "ml.training.train", True),
        ("ml.inference.ensemble", "ml.training.data", True),
        ("ml.training.train", "ml.inference", False),
        ("ml.models", "core.settings", True),
        ("core.db", "fastapi", True),
    ],
)
def test_rule_table(module: str, imported: str, bad: bool) -> None:
    assert (_forbidden(module, imported) is not None) is bad
