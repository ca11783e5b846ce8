"""Erasing a patient from the web interface (``POST /patients/erase`` then ``/patients/erase/confirm``)
on SQLite, in the world of tests/retention_world.py: the confirmation page shows the counts and
erases nothing; only the patient id typed again erases, as ``DELETE /v1/patients/{id}`` does."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core import ledger
from core.settings import get_settings
from core.store import FileStore
from services.web.auth import COOKIE_NAME
from tests.api_support import Key, make_key, web_cookie
from tests.retention_world import (
    KEEP,
    NORTH,
    SOUTH,
    TARGET,
    World,
    assert_only_patient_gone,
    audit_rows,
    build,
    dump,
    files,
    files_of,
    owned_by,
)
from tests.unit.test_workers_scoring import add_images, photo

Rows = dict[str, dict[tuple[Any, ...], tuple[Any, ...]]]


@pytest.fixture
def world(url: str) -> World:
    return build(url, FileStore(get_settings().store_path))


@pytest.fixture
def north(world: World) -> Key:
    return make_key(world.url, NORTH)


def _cookie(client: TestClient, key: Key) -> dict[str, str]:
    return web_cookie(client, key)


def _data(url: str) -> Rows:
    """Every row but the audit log, the keys and the sign-ins (a page view audits, touches its key,
    and signing in is a session row)."""
    return {t: rows for t, rows in dump(url).items() if t not in ("audit_event", "api_key", "web_session")}


def _shown_counts(html: str) -> dict[str, int]:
    return {
        table: int(n)
        for table, n in re.findall(
            r'<tr data-table="([a-z_]+)"><td>[^<]*</td><td class="num" data-count="(\d+)"', html
        )
    }


def _confirm(client: TestClient, key: Key, patient: str, typed: str | None, **headers: str) -> Any:
    form = {"patient_id": patient} if typed is None else {"patient_id": patient, "confirm": typed}
    return client.post(
        "/patients/erase/confirm", headers=_cookie(client, key) | headers, data=form, follow_redirects=False
    )


def test_the_patient_page_leads_to_a_confirmation_that_erases_nothing(
    client: TestClient, world: World, north: Key
) -> None:
    page = client.post("/patients", headers=_cookie(client, north), data={"patient_id": TARGET})
    assert page.status_code == 200 and 'action="/patients/erase"' in page.text
    gone = owned_by(world.url, world.target)
    before, stored = _data(world.url), files(world.store)

    resp = client.post("/patients/erase", headers=_cookie(client, north), data={"patient_id": TARGET})

    assert resp.status_code == 200, resp.text
    shown = _shown_counts(resp.text)
    assert {t: shown[t] for t in gone} == {t: len(keys) for t, keys in gone.items()}
    assert shown["scoring_job"] == 1 and shown["files"] == len(files_of(world.url, world.target)) > 0
    assert 'action="/patients/erase/confirm"' in resp.text and 'name="confirm"' in resp.text
    assert _data(world.url) == before and files(world.store) == stored
    assert audit_rows(world.url, "patient.erase") == []
    assert ledger.read_ledger(world.store.root / ledger.LEDGER_FILE).lines == []  # a preview: no line
    assert resp.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("typed", [None, "", "KEEP-2", "erase-1", " ERASE-"])
def test_a_missing_or_wrong_confirmation_erases_nothing(
    client: TestClient, world: World, north: Key, typed: str | None
) -> None:
    before, stored = _data(world.url), files(world.store)
    resp = _confirm(client, north, TARGET, typed)
    assert resp.status_code == 422
    assert "Nothing was erased" in resp.text and _shown_counts(resp.text)["patient"] == 1
    assert _data(world.url) == before and files(world.store) == stored
    assert audit_rows(world.url, "patient.erase") == []


def test_the_confirmed_erasure_deletes_the_patient_and_nothing_else(
    client: TestClient, world: World, north: Key
) -> None:
    gone = owned_by(world.url, world.target)
    unique = files_of(world.url, world.target)
    before, stored = dump(world.url), files(world.store)

    resp = _confirm(client, north, TARGET, f" {TARGET} ")

    assert resp.status_code == 303 and resp.headers["location"] == "/patients?erased=1"
    assert_only_patient_gone(before, dump(world.url), gone)
    assert files(world.store) == stored - unique  # the shared files (KEEP-2's, South's) stay
    [event] = audit_rows(world.url, "patient.erase")
    assert event.api_key_id == north.key_id and event.clinic_id == world.north
    assert event.detail is not None and event.detail["by"] == "web" and event.detail["files"] == len(unique)
    assert event.detail["rows"]["patient"] == 1 and TARGET not in str(event.detail)
    # the restore ledger (core.ledger) holds the erasure, as its audit row does
    [line] = ledger.read_ledger(world.store.root / ledger.LEDGER_FILE).confirmed()
    assert (line.kind, line.id, line.patient_hmac) == (
        "erasure",
        event.detail["ledger_entry"],
        event.detail["patient_hmac"],
    )
    shown = client.get(resp.headers["location"], headers=_cookie(client, north))
    assert shown.status_code == 200 and 'data-testid="patient-erased"' in shown.text
    # gone for North (South's own ERASE-1 stays); erasing again finds nothing
    assert (
        client.post("/patients", headers=_cookie(client, north), data={"patient_id": TARGET}).status_code
        == 404
    )
    south = make_key(world.url, SOUTH)
    assert (
        client.post("/patients", headers=_cookie(client, south), data={"patient_id": TARGET}).status_code
        == 200
    )
    assert _confirm(client, north, TARGET, TARGET).status_code == 404


def test_another_clinic_gets_404_and_erases_nothing(client: TestClient, world: World) -> None:
    south = make_key(world.url, SOUTH)  # South has no KEEP-2: North's stays
    before, stored = _data(world.url), files(world.store)
    resp = client.post("/patients/erase", headers=_cookie(client, south), data={"patient_id": KEEP})
    assert resp.status_code == 404 and "Erase permanently" not in resp.text
    assert _confirm(client, south, KEEP, KEEP).status_code == 404
    assert _data(world.url) == before and files(world.store) == stored
    assert audit_rows(world.url, "patient.erase") == []
    # North's own confirmation page: the 404 above is isolation, not a missing page
    own = client.post(
        "/patients/erase", headers=_cookie(client, make_key(world.url, NORTH)), data={"patient_id": KEEP}
    )
    assert own.status_code == 200 and "Erase permanently" in own.text


def test_signed_out_or_cross_site_posts_are_refused(client: TestClient, world: World, north: Key) -> None:
    before, stored = _data(world.url), files(world.store)
    form = {"patient_id": TARGET, "confirm": TARGET}
    for path in ("/patients/erase", "/patients/erase/confirm"):
        resp = client.post(path, data=form, follow_redirects=False)  # no cookie
        assert resp.status_code == 303 and resp.headers["location"].startswith("/login"), path
        revoked = client.post(path, headers={"Cookie": f"{COOKIE_NAME}=drs_not-a-key"}, data=form,
                              follow_redirects=False)  # fmt: skip
        assert revoked.status_code == 303, path
        # the forms' protection (services.web.auth.same_origin): another site's page posting
        forged = client.post(
            path, headers=_cookie(client, north) | {"Origin": "https://evil.example"}, data=form
        )
        assert forged.status_code == 403 and "another site" in forged.text, path
        # without Origin, another site's Referer or Sec-Fetch-Site gives it away (the security review)
        for told in ({"Referer": "https://evil.example/x"}, {"Sec-Fetch-Site": "cross-site"}):
            forged = client.post(path, headers=_cookie(client, north) | told, data=form)
            assert forged.status_code == 403 and "another site" in forged.text, (path, told)
    assert _data(world.url) == before and files(world.store) == stored
    assert audit_rows(world.url, "patient.erase") == []


def test_a_patient_with_a_photograph_being_scored_is_refused_clearly(
    client: TestClient, world: World, north: Key
) -> None:
    add_images(world.url, world.store, TARGET, [photo("1012_left.jpg")], clinic=NORTH)  # queued
    before, stored = _data(world.url), files(world.store)
    preview = client.post("/patients/erase", headers=_cookie(client, north), data={"patient_id": TARGET})
    assert preview.status_code == 409 and "still being scored" in preview.text
    assert "Erase permanently" not in preview.text  # no form to confirm
    resp = _confirm(client, north, TARGET, TARGET)
    assert resp.status_code == 409 and "still being scored" in resp.text
    assert _data(world.url) == before and files(world.store) == stored
    assert audit_rows(world.url, "patient.erase") == []
