"""The model page: the installed release, its model card and its metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from markdown_it import MarkdownIt

from services.deps import SettingsDep
from services.modelinfo import active_ref, model_info, read_manifest, released_ensembles
from services.web import auth, pages, present
from services.web.pages import WebPrincipal

router = APIRouter(include_in_schema=False)

_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


def _metric_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    chosen = card.get("chosen_rule")
    rows = []
    for name, splits in (card.get("metrics") or {}).items():
        if not isinstance(splits, dict):
            continue
        rows.append(
            {
                "name": name,
                "chosen": name == f"rule:{chosen}",
                "validation": splits.get("validation") or {},
                "test": splits.get("test") or {},
            }
        )
    return rows


@router.get("/model")
def model_page(request: Request, settings: SettingsDep, principal: WebPrincipal) -> Response:
    if principal is None:
        return auth.login_redirect(request)
    info = model_info(settings)
    ref = active_ref(settings)
    manifest = read_manifest(settings, ref) if ref else None
    card: dict[str, Any] = (manifest or {}).get("card") or {}
    card_html = None
    if ref is not None:
        card_path = released_ensembles(settings.models_dir)[ref].parent / "MODEL_CARD.md"
        if card_path.is_file():
            card_html = _markdown.render(card_path.read_text(encoding="utf-8"))
    rows = _metric_rows(card)
    chosen = next((r for r in rows if r["chosen"]), None)
    context = {
        "info": info,
        "card": card,
        "rows": rows,
        "chosen": chosen,
        "grade_names": present.GRADE_NAMES,
        "card_html": card_html,
        "combination": (manifest or {}).get("combination") or {},
    }
    return pages.render(request, "model.html", context, principal=principal)
