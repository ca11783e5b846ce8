"""What a clinic sees of one patient after a grader's grade: the API's patient answer, the home
page's "Patients to refer", the web patient page and a result page (tests of the grader's referral,
on SQLite and on PostgreSQL with a real worker)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api_support import Key, web_cookie


def _between(html: str, start: str, end: str) -> str:
    parts = html.split(start, 1)
    return parts[1].split(end, 1)[0] if len(parts) > 1 else ""


def _home_row(html: str, patient: str) -> str:
    """The home page's "Patients to refer" row of ``patient`` ("" when not listed)."""
    table = _between(html, 'data-testid="to-refer"', "</table>")
    for row in table.split("<tr")[1:]:
        if f">{patient}<" in row:
            return row
    return ""


def surfaces(client: TestClient, key: Key, patient: str, result_page: str | None = None) -> dict[str, Any]:
    """``result_page``: a result page's path (``/bundles/{id}`` or ``/images/{id}``) to read too."""
    api = client.get(f"/v1/patients/{patient}", headers=key.headers)
    assert api.status_code == 200, api.text
    body = api.json()
    cookie = web_cookie(client, key)
    row = _home_row(client.get("/", headers=cookie).text, patient)
    page = client.post("/patients", data={"patient_id": patient}, headers=cookie).text
    out = {
        "referable": body["referable"],
        "grade": body["grade"],
        "grader_refers": body.get("grader_refers"),
        "grader_referrals": body.get("grader_referrals"),
        "home_lists": bool(row),
        "home_grader": 'data-testid="grader-refers"' in row,
        "web": _between(page, 'data-testid="verdict-headline">', "</div>").strip(),
        "web_banner": _between(page, 'data-testid="verdict"', "</section>"),
    }
    if result_page is not None:
        html = client.get(result_page, headers=cookie).text
        out["page"] = _between(html, 'data-testid="verdict-headline">', "</div>").strip()
        out["page_banner"] = _between(html, 'data-testid="verdict"', "</section>")
    return out
