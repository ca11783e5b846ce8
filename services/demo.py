"""``drscreen demo``: the sample patients through the real pipeline, on one machine.

What runs: the database is migrated, a demo clinic and API key are created, a real worker
(``drscreen worker``, a subprocess) and the HTTP API (uvicorn, in a thread of this process) are
started; three sample patients are submitted as bundles and one as a folder job, exactly as clinic
software would; when every photograph is graded and explained, a per-patient table is printed with
the paths of the heatmaps (under ``<var>/demo/heatmaps``). Everything started is stopped again, also
on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from core import migrate
from core import repository as repo
from core.agreement import REFERABLE_FROM, Pair, describe, summarise, tally
from core.db import session_scope
from core.settings import PROJECT_ROOT, Settings, get_settings
from services.modelinfo import active_ref

log = logging.getLogger(__name__)

SAMPLES_DIR = PROJECT_ROOT / "samples"
CLINIC = "Demo clinic"
#: Everything (grades and heatmaps) must be in by then; 2 CPU cores need well under that.
DEADLINE_SECONDS = 600.0
WORKER_READY_SECONDS = 180.0
EYES = ("left", "right")


@dataclass
class Submission:
    patient: str
    via: str  # "bundle" or "job"
    resource_id: str
    image_ids: list[str] = field(default_factory=list)


def sample_patients(folder: Path = SAMPLES_DIR) -> dict[str, dict[str, list[Path]]]:
    """patient -> eye -> photographs, from ``samples/<patient>/<patient>_<eye>*.jpg``."""
    patients: dict[str, dict[str, list[Path]]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for eye in EYES:
            photos = sorted(sub.glob(f"{sub.name}_{eye}*.jpg"))
            if photos:
                patients.setdefault(sub.name, {})[eye] = photos
    return patients


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment(settings: Settings) -> dict[str, str]:
    """The settings the worker subprocess must share with the API (same database, broker, store)."""
    env = dict(os.environ)
    env.update(
        {
            "DRSCREEN_VAR_DIR": str(settings.var_dir),
            "DRSCREEN_DATABASE_URL": settings.database_url,
            "DRSCREEN_BROKER_URL": settings.broker_url,
            "DRSCREEN_STORE_DIR": str(settings.store_path),
            "DRSCREEN_IMPORT_ROOTS": settings.import_roots,
            "DRSCREEN_MODELS_DIR": str(settings.models_dir),
        }
    )
    if settings.model:
        env["DRSCREEN_MODEL"] = settings.model
    return env


@contextlib.contextmanager
def running_worker(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``drscreen worker`` in its own process group; stopped (TERM, then KILL) on the way out."""
    exe = Path(sys.executable).with_name("drscreen")
    cmd = [str(exe), "worker", "--concurrency", "1"] if exe.exists() else [
        sys.executable, "-m", "cli.main", "worker", "--concurrency", "1",
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=_environment(settings), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    # Lets an operator (or a test) check that nothing outlived the demo.
    (log_path.parent / "worker.pid").write_text(str(proc.pid))
    try:
        yield proc
    finally:
        _stop_process_group(proc)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_process_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """TERM the worker's whole group (Celery's warm shutdown), then KILL whatever is left: pool
    children can outlive their parent for a moment, and none may outlive the demo."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while process_group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # Orphaned pool children are reaped by init a moment later.
    deadline = time.monotonic() + 5
    while process_group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_worker_ready(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the worker exited with code {proc.returncode}:\n{tail}")
        if " ready." in log_path.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready after {timeout:.0f}s (log: {log_path})")


@contextlib.contextmanager
def running_api(settings: Settings) -> Iterator[str]:
    """The API on a free local port, served by uvicorn in a thread; yields its base URL."""
    import uvicorn

    from services.app import create_app

    port = _free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="drscreen-demo-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo API did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise RuntimeError(
            f"{resp.request.method} {resp.request.url.path} -> {resp.status_code}: {resp.text}"
        )
    return resp.json()


def submit(client: httpx.Client, patients: dict[str, dict[str, list[Path]]]) -> list[Submission]:
    """All patients but the last as bundles, the last as a folder job (with heatmaps)."""
    names = list(patients)
    submissions = []
    for name in names[:-1]:
        files = {}
        for eye, photos in patients[name].items():
            for n, photo in enumerate(photos[:2], start=1):
                files[f"{eye}_{n}"] = (photo.name, photo.read_bytes(), "image/jpeg")
        body = _check(client.post("/v1/bundles", data={"patient_id": name}, files=files))
        submissions.append(Submission(name, "bundle", body["id"]))
    last = names[-1]
    folder = SAMPLES_DIR / last
    body = _check(client.post("/v1/jobs", json={"folder": str(folder), "explain": True}))
    submissions.append(Submission(last, "job", body["id"]))
    return submissions


def _progress(client: httpx.Client, sub: Submission) -> tuple[int, int, bool]:
    """(finished photographs, photographs, all finished) of one submission; fills its image ids."""
    if sub.via == "bundle":
        body = _check(client.get(f"/v1/bundles/{sub.resource_id}"))
        sub.image_ids = [im["id"] for im in body["images"]]
        finished = sum(im["status"] in ("done", "failed") for im in body["images"])
        return finished, len(body["images"]), body["status"] in ("done", "failed")
    job = _check(client.get(f"/v1/jobs/{sub.resource_id}"))
    if job["status"] == "failed":
        raise RuntimeError(f"the folder job failed: {job.get('error')}")
    page = _check(client.get(f"/v1/jobs/{sub.resource_id}/results", params={"limit": 100}))
    sub.image_ids = [row["image_id"] for row in page["items"] if row["image_id"]]
    total = max(job["total"], 2)
    return job["done"] + job["failed"], total, job["status"] == "done"


def _heatmap_ready(client: httpx.Client, image_id: str, out: Path) -> bool:
    resp = client.get(f"/v1/images/{image_id}/explanation")
    if resp.status_code == 200:
        out.write_bytes(resp.content)
        return True
    if resp.status_code in (404, 409):  # 409: not drawn yet; 404: the photograph failed
        return resp.status_code == 404
    _check(resp)
    return False


def wait_for_results(
    client: httpx.Client, submissions: list[Submission], heatmap_dir: Path, deadline: float
) -> dict[str, Path]:
    """Poll until every photograph is graded and has its heatmap; returns image id -> PNG path."""
    heatmaps: dict[str, Path] = {}
    expected = 8
    with tqdm(total=expected * 2, desc="grading + heatmaps", unit="step", file=sys.stderr) as bar:
        while True:
            states = [_progress(client, sub) for sub in submissions]
            graded = sum(s[0] for s in states)
            expected = max(expected, sum(s[1] for s in states))
            all_graded = all(s[2] for s in states)
            if all_graded:
                for sub in submissions:
                    for image_id in sub.image_ids:
                        if image_id in heatmaps:
                            continue
                        image = _check(client.get(f"/v1/images/{image_id}"))
                        out = heatmap_dir / f"{sub.patient}_{image['eye']}_{image_id[:8]}.png"
                        if _heatmap_ready(client, image_id, out) and out.exists():
                            heatmaps[image_id] = out
                        elif image["status"] == "failed":
                            heatmaps[image_id] = Path("-")
            bar.total = expected * 2
            bar.n = graded + len(heatmaps)
            bar.refresh()
            if all_graded and all(i in heatmaps for sub in submissions for i in sub.image_ids):
                return heatmaps
            if time.monotonic() > deadline:
                raise TimeoutError("the demo did not finish in time (see the worker log)")
            time.sleep(1.0)


def reference_grades(folder: Path = SAMPLES_DIR) -> dict[str, int]:
    """Each sample patient's reference grade (worse eye) from ``samples/labels.csv``."""
    grades: dict[str, int] = {}
    with open(folder / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            grades[row["patient_id"]] = max(grades.get(row["patient_id"], 0), int(row["grade"]))
    return grades


def photograph_references(folder: Path = SAMPLES_DIR) -> dict[tuple[str, str], int]:
    """(patient, eye) -> the EyePACS grade of that eye's sample photograph (one per eye)."""
    with open(folder / "labels.csv", newline="") as fh:
        return {(row["patient_id"], row["eye"]): int(row["grade"]) for row in csv.DictReader(fh)}


def record_references_and_compare(
    client: httpx.Client, submissions: list[Submission], console: Console
) -> None:
    """Record each photograph's EyePACS grade as its grader's grade (through the API, as a
    clinic's grading software would) and print how the model agrees with them over this run's
    photographs: the check a screening programme runs on its graders' grades
    (``GET /v1/agreement`` computes the same over a clinic's photographs)."""
    references = photograph_references()
    pairs = []
    release: str | None = None
    for sub in submissions:
        for image_id in sub.image_ids:
            image = _check(client.get(f"/v1/images/{image_id}"))
            grade = references.get((image["patient_id"], image["eye"]))
            if grade is None:
                continue
            body = {"grade": grade, "grader": "EyePACS label (samples/labels.csv)"}
            _check(client.put(f"/v1/images/{image_id}/grader-grade", json=body))
            release = image.get("model_version") or release
            graded = image["gradable"] and image["grade"] is not None
            model = image["grade"] if graded else None
            pairs.append(Pair(image_id, grade, model, image["referable"] if graded else True))
    missed = [
        p.image_id
        for p in pairs
        if p.grader is not None and p.grader >= REFERABLE_FROM and not p.model_referable
    ]
    agreement = summarise(tally(pairs), missed=missed, model_version=release)
    console.print(
        "agreement with the EyePACS grades, recorded as graders' grades (PUT /v1/images/ID/grader-grade):",
        soft_wrap=True,
    )
    for line in describe(agreement):
        console.print(f"  {line}", soft_wrap=True)


def _grade(value: Any) -> str:
    return "ungradable" if value is None else str(value)


def render(
    client: httpx.Client, submissions: list[Submission], heatmaps: dict[str, Path], console: Console
) -> None:
    table = Table(title="drscreen demo: sample patients")
    for column in ("patient", "via", "left", "right", "patient grade", "referable", "gradable", "reference"):
        table.add_column(column)
    reference = reference_grades()
    for sub in submissions:
        p = _check(client.get(f"/v1/patients/{sub.patient}"))
        eyes = p.get("eyes", {})
        table.add_row(
            sub.patient,
            sub.via,
            _grade(eyes.get("left", {}).get("grade")) if "left" in eyes else "-",
            _grade(eyes.get("right", {}).get("grade")) if "right" in eyes else "-",
            _grade(p["grade"]),
            "yes" if p["referable"] else "no",
            "yes" if p["gradable"] else "no",
            str(reference.get(sub.patient, "-")),
        )
    console.print(table)
    console.print("reference: the patient's grade from the EyePACS labels (samples/README.md)")
    console.print(f"model: {p.get('model_version')}")
    console.print("heatmaps (Grad-CAM over each photograph):")
    for path in sorted(str(h) for h in heatmaps.values() if str(h) != "-"):
        console.print(f"  {path}", soft_wrap=True)  # whole paths, never wrapped


def _demo_key(settings: Settings) -> str:
    with session_scope(settings.database_url) as session:
        clinic = repo.get_or_create_clinic(session, CLINIC)
        _row, key = repo.create_api_key(session, clinic, label="drscreen demo")
    return key


def run_demo() -> None:
    """Run the demo on the configured (default: embedded) settings; see the module docstring."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # kombu warns that the file broker has no hostname: true, and of no use to the person waiting.
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    console = Console()
    base = get_settings()
    roots = ":".join(filter(None, [base.import_roots, str(SAMPLES_DIR)]))
    settings = base.model_copy(update={"import_roots": roots})
    if active_ref(settings) is None:
        console.print(
            f"[red]no released model under {settings.models_dir}[/red] (or DRSCREEN_MODEL is wrong)"
        )
        raise SystemExit(2)
    patients = sample_patients()
    demo_dir = settings.var_dir / "demo"
    heatmap_dir = demo_dir / "heatmaps"
    heatmap_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.database_url)
    key = _demo_key(settings)
    console.print(
        f"drscreen demo: {len(patients)} sample patients, model {active_ref(settings)}, "
        f"data under {settings.var_dir}",
        soft_wrap=True,
    )
    worker_log = demo_dir / "worker.log"
    deadline = time.monotonic() + DEADLINE_SECONDS
    with running_worker(settings, worker_log) as worker, running_api(settings) as base_url:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
            submissions = submit(client, patients)
            console.print("submitted; starting the worker (loading the ensemble) ...")
            _wait_worker_ready(worker, worker_log, WORKER_READY_SECONDS)
            heatmaps = wait_for_results(client, submissions, heatmap_dir, deadline)
            render(client, submissions, heatmaps, console)
            record_references_and_compare(client, submissions, console)
    console.print(f"worker log: {worker_log}", soft_wrap=True)
