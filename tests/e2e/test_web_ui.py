"""The web interface in a real headless Chromium (Debian's ``chromium``, driven by Playwright), against
the API in a uvicorn subprocess and a real worker process on PostgreSQL and Redis.

Signs in, uploads a visit of sample photographs, waits for the page to show the result, checks that
the grades shown are the API's for the same visit, then a non-fundus photograph (ungradable: REFER),
the patient's history, a folder job with its CSV, the model page, erasing a patient, and signing
out. Screenshots go to a temporary folder, or to ``DRSCREEN_TEST_SCREENSHOTS_DIR`` when set: ``make
screenshots`` sets it to ``docs/screenshots/`` and runs this test on the shipped ensemble (the suite
itself runs on the tiny development model, whose figures must not end up in the documentation).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from PIL import Image as PILImage
from sqlalchemy import delete, update

from core.db import session_scope
from core.tables import Explanation, Image, utcnow
from tests.api_support import SAMPLES, Key, make_key, model_env, sample
from tests.conftest import REPO_ROOT, WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = Path(os.environ.get("DRSCREEN_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Everything is slow on a shared 2-core machine: generous limits.
SCORING_TIMEOUT_MS = 420_000
STEP_TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def env(pg_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    # A Redis database of its own, so no other test module's worker takes these messages.
    broker = redis_url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(broker).flushdb()
    return {
        "DRSCREEN_DATABASE_URL": pg_url,
        "DRSCREEN_BROKER_URL": broker,
        "DRSCREEN_STORE_DIR": str(tmp_path / "store"),  # shared by the API and the worker
        "DRSCREEN_VAR_DIR": str(tmp_path / "var"),
        "DRSCREEN_IMPORT_ROOTS": str(SAMPLES),
        "OMP_NUM_THREADS": "1",
        **model_env(),
    }


@pytest.fixture
def api_url(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``uvicorn --factory services.app:create_app`` in a subprocess, as operators run it."""
    port = _free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DRSCREEN_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO_ROOT)
    log = tmp_path / "api.log"
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "services.app:create_app"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, env=full_env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"API exited with {proc.returncode}:\n{log.read_text()}", pytrace=False)
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"API not up after 120 s:\n{log.read_text()}", pytrace=False)
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A fresh Chromium page (Debian's binary: Playwright downloads no browser)."""
    if not CHROMIUM.exists() or shutil.which("chromedriver") is None:
        pytest.fail(
            f"{CHROMIUM} not found: apt-get install -y chromium chromium-driver (.ci/run does)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.set_default_navigation_timeout(STEP_TIMEOUT_MS)
            yield page
            context.close()
        finally:
            browser.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DRSCREEN_TEST_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _api(api_url: str, key: Key, path: str) -> Any:
    resp = httpx.get(f"{api_url}{path}", headers=key.headers, timeout=30)
    assert resp.status_code == 200, (path, resp.status_code, resp.text)
    return resp.json()


def _wait_complete(page: Any) -> None:
    """The page polls and reloads itself; wait for the version that says it is complete."""
    page.wait_for_selector('[data-testid=result][data-complete="true"]', timeout=SCORING_TIMEOUT_MS)
    page.wait_for_load_state("load")


def _shown_grade(attr: str | None) -> int | None:
    return None if attr in (None, "") else int(attr)


def _all_images_loaded(page: Any) -> bool:
    loaded: bool = page.evaluate(
        "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    )
    return loaded


def _non_fundus_photo(path: Path) -> Path:
    """A flat grey card with a few stripes: decodes fine, but is no fundus photograph."""
    img = PILImage.new("RGB", (480, 360), (150, 150, 150))
    for x in range(0, 480, 40):
        img.paste((90, 90, 90), (x, 0, x + 12, 360))
    img.save(path, format="PNG")
    return path


def test_web_interface_in_chromium(
    env: dict[str, str],
    api_url: str,
    browser_page: Any,
    start_worker: Callable[..., WorkerProcess],
    screenshots: Path,
    tmp_path: Path,
) -> None:
    page = browser_page
    worker = start_worker(env=env, ready_timeout=180)
    # a clinic of its own: the session's database is shared with tests that screen the same samples
    key = make_key(env["DRSCREEN_DATABASE_URL"], f"North-web-{uuid.uuid4().hex[:8]}")

    # Signed out: every page leads to the login form.
    page.goto(f"{api_url}/jobs")
    assert page.url.startswith(f"{api_url}/login")
    page.fill("#api_key", "drs_not-a-key")
    page.click("#login-form button[type=submit]")
    assert "Unknown or revoked" in page.inner_text("[role=alert]")
    page.fill("#api_key", key.key)
    _shot(page, screenshots, "web-login.png")
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{api_url}/jobs")
    cookie = next(c for c in page.context.cookies() if c["name"] == "drscreen_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    assert key.key not in cookie["value"]  # a session token, not the clinic's API key

    # A visit of patient 229: one photograph per eye.
    page.goto(f"{api_url}/")
    page.fill("#bundle-patient", "229")
    page.set_input_files("#left_1", str(sample("229", "left")))
    page.set_input_files("#right_1", str(sample("229", "right")))
    _shot(page, screenshots, "web-upload.png")
    page.click("#bundle-form button[type=submit]")
    page.wait_for_url(f"{api_url}/bundles/*")
    bundle_id = page.url.rsplit("/", 1)[-1]
    _wait_complete(page)
    context = f"worker log:\n{worker.output()[-3000:]}"

    # What the page shows is what the API answers for the same visit.
    api = _api(api_url, key, f"/v1/bundles/{bundle_id}")
    assert api["status"] == "done", context
    patient = api["patient"]
    assert page.get_attribute("[data-testid=result]", "data-status") == "done"
    assert _shown_grade(page.get_attribute("[data-testid=patient-grade]", "data-grade")) == patient["grade"]
    assert page.inner_text("[data-testid=patient-referable]") == ("yes" if patient["referable"] else "no")
    tone = page.get_attribute("[data-testid=verdict]", "data-tone")
    assert tone == ("refer" if patient["referable"] or not patient["gradable"] else "ok")
    headline = page.inner_text("[data-testid=verdict-headline]")
    assert headline.startswith("REFER") if tone == "refer" else headline == "No referral"
    # the banner names the eye behind each of the API's referral reasons
    detail = page.inner_text("[data-testid=verdict] .banner-detail")
    for reason in patient["referral_reasons"]:
        assert reason.split("_eye_")[0].capitalize() + " eye" in detail, (reason, detail)
    for eye, summary in patient["eyes"].items():
        shown = page.locator(f"[data-testid=eye-{eye}-grade]")
        assert _shown_grade(shown.get_attribute("data-grade")) == (
            summary["grade"] if summary["gradable"] else None
        )
    photos = page.locator("[data-testid=photo]")
    assert photos.count() == len(api["images"]) == 2
    for image in api["images"]:
        card = page.locator(f"[data-testid=photo][data-image-id='{image['id']}']")
        assert (
            _shown_grade(card.locator("[data-testid=photo-grade]").get_attribute("data-grade"))
            == image["grade"]
        )
        assert card.locator(".probs .bar-row").count() == 5
        assert card.locator("[data-testid=heatmap]").count() == 1
    page.wait_for_function(
        "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
        timeout=STEP_TIMEOUT_MS,
    )
    assert _all_images_loaded(page)  # originals and heatmaps, through the cookie-authenticated routes
    _shot(page, screenshots, "web-result.png")

    # On paper (the patient's record): the decision and both eyes, no navigation or buttons, when printed.
    assert page.locator("[data-testid=print]").is_visible()
    page.emulate_media(media="print")
    assert (
        not page.locator(".topbar nav").is_visible() and not page.locator("[data-testid=print]").is_visible()
    )
    assert (
        page.locator("[data-testid=printed]").is_visible()
        and page.locator("[data-testid=verdict]").is_visible()
    )
    assert (
        page.locator("[data-testid=eye-left]").is_visible()
        and page.locator("[data-testid=eye-right]").is_visible()
    )
    _shot(page, screenshots, "web-print.png")
    assert page.pdf(path=str(tmp_path / "result.pdf"))[:5] == b"%PDF-"  # Chromium lays it out on paper
    page.emulate_media(media="screen")

    # The session ends while the page waits for a heatmap: the page's poll is refused (401) and
    # it goes to sign in with itself as `next`, and is back after signing in (it went to a bare
    # /login, then the home page: the clinician had to find the patient again).
    lost = api["images"][0]["id"]
    with session_scope(env["DRSCREEN_DATABASE_URL"]) as s:
        s.execute(delete(Explanation).where(Explanation.image_id == lost))
    page.reload()
    assert page.locator("[data-progress-url]").count() == 1  # waiting for the heatmap
    page.context.clear_cookies()
    page.wait_for_url(f"{api_url}/login?next=%2Fbundles%2F{bundle_id}", timeout=STEP_TIMEOUT_MS)
    page.fill("#api_key", key.key)
    page.click("#login-form button[type=submit]")
    page.wait_for_url(f"{api_url}/bundles/{bundle_id}")

    # A heatmap that never came (its message lost): "ask again" asks in place and shows it once
    # drawn (the link opened the heatmap route's bare "not ready yet" text).
    with session_scope(env["DRSCREEN_DATABASE_URL"]) as s:
        s.execute(update(Image).where(Image.id == lost).values(finished_at=utcnow() - timedelta(hours=1)))
    page.reload()
    card = page.locator(f"[data-testid=photo][data-image-id='{lost}']")
    card.locator("[data-heatmap-missing] a").click()
    card.locator("img[data-testid=heatmap]").wait_for(timeout=STEP_TIMEOUT_MS)
    # drawn, not only placed: a blob: address was blocked by the pages' CSP (the review)
    page.wait_for_function(
        f"() => {{ const i = document.querySelector(\"[data-image-id='{lost}'] img[data-testid=heatmap]\");"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=STEP_TIMEOUT_MS,
    )
    assert page.url.endswith(f"/bundles/{bundle_id}")

    # A grader's blind page of one of the visit's photographs (what docs/screenshots shows)
    page.goto(f"{api_url}/grade/{api['images'][0]['id']}")
    page.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=grade-photo]');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=STEP_TIMEOUT_MS,
    )
    assert page.locator("[data-testid=verdict]").count() == 0
    _shot(page, screenshots, "web-grade.png")
    page.goto(f"{api_url}/bundles/{bundle_id}")

    # Graders' grades through the result page's forms: shown beside the model's grade (which stays)
    # once back on the visit; a grade of 4 refers the patient, on the grader's word when the model
    # did not (session 32); then the clinic's agreement with them.
    for image, grade in zip(api["images"], (api["images"][0]["grade"], 4), strict=True):
        card = page.locator(f"[data-testid=photo][data-image-id='{image['id']}']")
        card.locator("select[name=grade]").select_option("ungradable" if grade is None else str(grade))
        card.locator("input[name=grader]").fill("Dr E2E")
        with page.expect_navigation():
            card.locator("[data-testid=grader-form] button[type=submit]").click()
        # back at the photograph saved, which says so (it was the page's top, silently)
        assert page.url == f"{api_url}/bundles/{bundle_id}?saved={image['id']}#photo-{image['id']}"
        assert card.locator("[data-testid=grader-saved]").is_visible()
        shown = card.locator("[data-testid=grader-grade]")
        assert _shown_grade(shown.get_attribute("data-grade")) == grade
        assert card.locator("[data-testid=grader-name]").inner_text() == "Dr E2E"
        assert (
            _shown_grade(card.locator("[data-testid=photo-grade]").get_attribute("data-grade"))
            == image["grade"]
        )
    assert page.get_attribute("[data-testid=verdict]", "data-tone") == "refer"
    headline = page.inner_text("[data-testid=verdict-headline]")
    assert headline.startswith("REFER") if tone == "refer" else headline == "REFER (grader)", (tone, headline)
    page.click("nav a[href='/agreement']")
    page.wait_for_url(f"{api_url}/agreement")
    agreement = _api(api_url, key, "/v1/agreement")
    assert agreement["n_images"] + agreement["n_awaiting_model"] == 2
    assert page.get_attribute("[data-testid=n-images]", "data-value") == str(agreement["n_images"])
    _shot(page, screenshots, "web-agreement.png")

    # One photograph that is no fundus: ungradable, so REFER, impossible to miss.
    page.goto(f"{api_url}/")
    page.fill("#image-patient", "QA-1")
    page.check("input[name=eye][value=right]")
    page.set_input_files("#image-file", str(_non_fundus_photo(tmp_path / "card.png")))
    page.click("#image-form button[type=submit]")
    page.wait_for_url(f"{api_url}/images/*")
    image_id = page.url.rsplit("/", 1)[-1]
    _wait_complete(page)
    single = _api(api_url, key, f"/v1/images/{image_id}")
    assert single["status"] == "done" and single["gradable"] is False, single
    assert page.get_attribute("[data-testid=verdict]", "data-tone") == "refer"
    assert page.inner_text("[data-testid=verdict-headline]") == "REFER — UNGRADABLE"
    assert page.inner_text("[data-testid=photo-grade]") == "UNGRADABLE"
    assert page.locator("[data-testid=reasons] li").count() == len(single["quality"]["reasons"]) > 0
    _shot(page, screenshots, "web-ungradable.png")

    # The graders' list: the ungradable photograph (a referral) waits there; its blind page shows
    # the photograph and the form, not the service's verdict; saved, it leaves the list.
    page.click("nav a[href='/grading-queue']")
    page.wait_for_url(f"{api_url}/grading-queue")
    row = page.locator(f"[data-testid=queue-item][data-image='{image_id}']")
    row.locator("a").click()
    page.wait_for_url(f"{api_url}/grade/{image_id}")
    assert page.locator("[data-testid=verdict]").count() == 0
    assert page.locator("[data-testid=photo-grade]").count() == 0
    page.wait_for_function(
        "() => { const i = document.querySelector('[data-testid=grade-photo]');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=STEP_TIMEOUT_MS,
    )
    page.select_option("select[name=grade]", "ungradable")
    page.fill("input[name=grader]", "Dr E2E")
    with page.expect_navigation():
        page.click("[data-testid=grader-form] button[type=submit]")
    assert page.url == f"{api_url}/grading-queue"
    assert page.locator(f"[data-testid=queue-item][data-image='{image_id}']").count() == 0

    # The patient's history.
    page.goto(f"{api_url}/patients")
    page.fill("#patient-query", "229")
    page.click("#patient-form button[type=submit]")
    history = _api(api_url, key, "/v1/patients/229")["history"]
    assert page.locator("[data-testid=history] tbody tr").count() == len(history) >= 1
    # looked up by POST: no patient id in URLs or access logs (the path and query, not the port)
    looked_up = urlsplit(page.url)
    assert "229" not in looked_up.path + looked_up.query
    _shot(page, screenshots, "web-patient.png")

    # A folder job: progress, then its CSV.
    page.goto(f"{api_url}/jobs")
    page.fill("#job-folder", str(SAMPLES / "19"))
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("[data-testid=job]")
    job_id = page.get_attribute("[data-testid=job]", "data-job-id")
    # typing while the page waits for the job: its reload (every 5 s) emptied the field; it now
    # waits, and says so, until the field is left as it was
    page.fill("#job-folder", "/typed/while/the/job/runs")
    page.wait_for_function(
        "() => (document.querySelector('[data-refresh-text]') || {}).textContent"
        "?.startsWith('Jobs may have moved on')",
        timeout=STEP_TIMEOUT_MS,
    )
    assert page.input_value("#job-folder") == "/typed/while/the/job/runs"
    page.evaluate(
        "() => { const f = document.querySelector('#job-folder'); f.value = f.defaultValue; f.blur(); }"
    )
    page.wait_for_selector(
        f'[data-testid=job][data-job-id="{job_id}"][data-status="done"]', timeout=SCORING_TIMEOUT_MS
    )
    assert _api(api_url, key, f"/v1/jobs/{job_id}")["done"] == 2
    _shot(page, screenshots, "web-jobs.png")
    with page.expect_download() as download_info:
        page.click(f'[data-job-id="{job_id}"] [data-testid=csv-link]')
    rows = list(csv.DictReader(io.StringIO(Path(download_info.value.path()).read_text())))
    assert sorted(r["patient_id"] for r in rows) == ["19", "19"]
    api_rows = {r["image_id"]: r for r in _api(api_url, key, f"/v1/jobs/{job_id}/results")["items"]}
    for row in rows:
        expected = api_rows[row["image_id"]]["grade"]
        assert row["grade"] == ("" if expected is None else str(expected))

    # The model in use and its card.
    page.goto(f"{api_url}/model")
    models = _api(api_url, key, "/v1/models")
    assert (
        page.inner_text("[data-testid=model-version]") == models["version"] == model_env()["DRSCREEN_MODEL"]
    )
    assert page.locator("[data-testid=metrics] tbody tr").count() >= len(models["members"])
    assert page.locator("[data-testid=model-card] table").count() >= 1
    _shot(page, screenshots, "web-model.png")

    # Erasing a patient (right to erasure): the counts, the id typed again, then gone.
    page.goto(f"{api_url}/patients")
    page.fill("#patient-query", "QA-1")
    page.click("#patient-form button[type=submit]")
    page.click("#erase-form button[type=submit]")
    assert page.get_attribute("[data-table=image] [data-count]", "data-count") == "1"
    page.fill("#erase-confirm", "QA-")  # not the id: nothing erased
    page.click("#erase-confirm-form button[type=submit]")
    assert "Nothing was erased" in page.inner_text("[data-testid=erase-error]")
    assert _api(api_url, key, "/v1/patients/QA-1")["patient_id"] == "QA-1"
    page.fill("#erase-confirm", "QA-1")
    page.click("#erase-confirm-form button[type=submit]")
    page.wait_for_url(f"{api_url}/patients?erased=1")
    assert page.locator("[data-testid=patient-erased]").count() == 1
    gone = httpx.get(f"{api_url}/v1/patients/QA-1", headers=key.headers, timeout=30)
    assert gone.status_code == 404 and httpx.get(f"{api_url}/v1/images/{image_id}", headers=key.headers,
                                                 timeout=30).status_code == 404  # fmt: skip
    assert _api(api_url, key, "/v1/patients/229")["patient_id"] == "229"  # the other patient stays

    # A phone's width: no page is wider than the screen (the staff walkthrough: tables and long
    # folder names pushed pages sideways); an unknown address is a page, not the API's JSON.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/", "/jobs", "/model", "/agreement", "/patients", f"/bundles/{bundle_id}"):
        page.goto(f"{api_url}{path}")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow} px wider than a phone's screen"
    _shot(page, screenshots, "web-phone-visit.png")
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{api_url}/no-such-page")
    assert "There is no such page" in page.inner_text("main")

    # Signing out ends the session, on the server too: its cookie copied before no longer works.
    copied = next(c for c in page.context.cookies() if c["name"] == "drscreen_session")["value"]
    page.click("header button:has-text('Sign out')")
    page.wait_for_url(f"{api_url}/login")
    replayed = httpx.get(f"{api_url}/jobs", cookies={"drscreen_session": copied}, timeout=10)
    assert replayed.status_code == 303 and replayed.headers["location"].startswith("/login")
    page.goto(f"{api_url}/bundles/{bundle_id}")
    assert page.url.startswith(f"{api_url}/login")
    assert httpx.get(f"{api_url}/images/{image_id}/photo", timeout=10).status_code == 401
