"""A small clinic's load on a running drscreen, and what it left in the database.

    python scripts/sqlite_load.py --api http://127.0.0.1:8000 --key KEY --db var/drscreen.db \
        [--clients 12] [--seconds 180] [--job-folder /srv/exports/x] [--backup-dir /tmp/b] [--drain 900]

Against an API and worker(s) the operator started (embedded defaults: SQLite and the file broker;
``--db`` is the SQLite file, read only to count). For ``--seconds``: ``--clients`` threads each
upload single photographs and bundles (patients drawn from a small pool, so two photographs of
one patient often arrive together), read results and web pages, and save graders' grades; a
folder job is posted at the start; one thread runs ``drscreen status``, ``drscreen data purge
--dry-run`` and ``drscreen db backup`` over and over. Then it waits (at most ``--drain`` s) for
the queue to empty and prints: requests, answers by kind, p50/p95 per kind of request, the
operator commands' exit codes, the largest WAL file seen, and what the database holds against
what the clients were told (photographs lost or duplicated, predictions written twice, patients
with other than one current result, bundles whose stored status disagrees with their
photographs'). Every loop is bounded by ``--seconds`` and ``--drain``; traffic goes only to
``--api``. Session 32's SQLite review (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared/data/eyepacs-natural-512/images"


@dataclass
class Tally:
    """What the clients saw, shared by the threads (one lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: Counter[str] = field(default_factory=Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    images: set[str] = field(default_factory=set)  # ids a 2xx answered with
    bundles: set[str] = field(default_factory=set)
    bundle_photos: int = 0
    done_images: list[str] = field(default_factory=list)
    operator: Counter[str] = field(default_factory=Counter)
    operator_errors: list[str] = field(default_factory=list)
    wal_max: int = 0
    details: dict[str, str] = field(default_factory=dict)  # an example body of each error answer

    def record(self, kind: str, started: float, outcome: str) -> None:
        with self.lock:
            self.answers[f"{kind} {outcome}"] += 1
            self.latency[kind].append(time.monotonic() - started)


def _outcome(response: httpx.Response) -> str:
    if response.status_code < 400:
        return str(response.status_code)
    try:
        code = response.json().get("error", "")
    except ValueError:
        code = ""
    return f"{response.status_code} {code}".strip()


def _photo(rng: random.Random, photos: list[Path]) -> tuple[str, bytes, str]:
    path = rng.choice(photos)
    return (path.name, path.read_bytes(), "image/jpeg")


def _client_loop(n: int, args: argparse.Namespace, photos: list[Path], tally: Tally, until: float) -> None:
    rng = random.Random(1000 + n)
    headers = {"Authorization": f"Bearer {args.key}"}
    with httpx.Client(base_url=args.api, timeout=90.0) as client:
        signed_in = False
        while time.monotonic() < until:
            # a pool of patients shared by every client: photographs of one patient meet
            patient = f"P{rng.randrange(args.patients)}"
            roll = rng.random()
            started = time.monotonic()
            kind = "?"
            try:
                if roll < 0.40:
                    wait = "?wait=30" if rng.random() < 0.3 else ""
                    kind = "POST /v1/images" + (" ?wait=30" if wait else "")
                    r = client.post(
                        f"/v1/images{wait}",
                        headers=headers,
                        data={"patient_id": patient, "eye": rng.choice(["left", "right"])},
                        files={"file": _photo(rng, photos)},
                    )
                    if r.status_code in (200, 202):
                        with tally.lock:
                            tally.images.add(r.json()["id"])
                elif roll < 0.55:
                    kind = "POST /v1/bundles"
                    slots = rng.sample(["left_1", "left_2", "right_1", "right_2"], rng.randint(2, 4))
                    # distinct photographs: one photograph as both eyes is refused (422, on purpose)
                    names = rng.sample(photos, len(slots))
                    files = {
                        s: (p.name, p.read_bytes(), "image/jpeg") for s, p in zip(slots, names, strict=True)
                    }
                    r = client.post("/v1/bundles", headers=headers, data={"patient_id": patient}, files=files)
                    if r.status_code == 202:
                        with tally.lock:
                            tally.bundles.add(r.json()["id"])
                            tally.bundle_photos += len(slots)
                elif roll < 0.75:
                    kind = "GET /v1/images|patients|bundles"
                    with tally.lock:
                        known = list(tally.images)[-50:]
                        known_bundles = list(tally.bundles)[-50:]
                    pick = rng.random()
                    if pick < 0.4 and known:
                        r = client.get(f"/v1/images/{rng.choice(known)}", headers=headers)
                        if r.status_code == 200 and r.json().get("status") == "done":
                            with tally.lock:
                                tally.done_images.append(r.json()["id"])
                    elif pick < 0.7 and known_bundles:
                        r = client.get(f"/v1/bundles/{rng.choice(known_bundles)}", headers=headers)
                    else:
                        r = client.get(f"/v1/patients/{patient}", headers=headers)
                        if r.status_code == 404:  # not uploaded yet: a clinic would see the same
                            tally.record(kind, started, "404 (patient not uploaded yet)")
                            continue
                elif roll < 0.90 and args.csv_job and rng.random() < args.csv_share:
                    kind = "GET job results CSV"
                    r = client.get(f"/v1/jobs/{args.csv_job}/results?format=csv", headers=headers)
                elif roll < 0.90:
                    kind = "GET web pages"
                    if not signed_in:
                        r = client.post("/login", data={"api_key": args.key, "next": "/"})
                        signed_in = r.status_code in (200, 303)
                    r = client.get(rng.choice(["/", "/jobs", "/grading-queue", "/agreement"]))
                    if r.status_code == 404:
                        r = client.get("/")
                else:
                    kind = "PUT grader-grade"
                    with tally.lock:
                        done = list(tally.done_images)[-50:]
                    if not done:
                        continue
                    r = client.put(
                        f"/v1/images/{rng.choice(done)}/grader-grade",
                        headers=headers,
                        json={"grade": rng.randint(0, 4), "grader": f"grader{n % 3}"},
                    )
                tally.record(kind, started, _outcome(r))
                if r.status_code >= 400:
                    with tally.lock:
                        tally.details.setdefault(f"{kind} {_outcome(r)}", r.text[:200])
            except httpx.HTTPError as exc:
                tally.record(kind, started, f"exception {type(exc).__name__}")


def _operator_loop(args: argparse.Namespace, tally: Tally, until: float) -> None:
    """The operator at the same time: status, a purge preview, a backup; exit codes counted."""
    env = dict(os.environ)
    commands = [
        ["status"],
        ["data", "purge", "--older-than", "3650", "--dry-run"],
        ["db", "backup", args.backup_dir],
    ]
    i = 0
    while time.monotonic() < until:
        cmd = commands[i % len(commands)]
        i += 1
        started = time.monotonic()
        done = subprocess.run([args.drscreen, *cmd], env=env, capture_output=True, text=True, timeout=300)
        name = " ".join(cmd[:2])
        with tally.lock:
            tally.operator[f"{name} exit {done.returncode}"] += 1
            tally.latency[f"drscreen {name}"].append(time.monotonic() - started)
            text = done.stdout + done.stderr
            if "locked" in text or "Traceback" in text or done.returncode not in (0, 1):
                tally.operator_errors.append(f"{name}: exit {done.returncode}: {text.strip()[-300:]}")
        time.sleep(2.0)


def _wal_watch(db: Path, tally: Tally, until: float) -> None:
    wal = Path(f"{db}-wal")
    while time.monotonic() < until:
        size = wal.stat().st_size if wal.exists() else 0
        with tally.lock:
            tally.wal_max = max(tally.wal_max, size)
        time.sleep(0.5)


def _open(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _drain(db: Path, seconds: float) -> float:
    """Wait until no photograph is queued or running and no job is open; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with _open(db) as conn:
            (busy,) = conn.execute(
                "SELECT count(*) FROM image WHERE status IN ('queued','running')"
            ).fetchone()
            (jobs,) = conn.execute(
                "SELECT count(*) FROM scoring_job WHERE status NOT IN ('done','failed')"
            ).fetchone()
        if busy == 0 and jobs == 0:
            break
        time.sleep(3.0)
    return time.monotonic() - started


def _ids(db: Path) -> tuple[set[str], set[str], set[str]]:
    """Single-upload image ids, bundle image ids, bundle ids now in the database."""
    with _open(db) as conn:
        q = conn.execute
        single = {r[0] for r in q("SELECT id FROM image WHERE job_id IS NULL AND bundle_id IS NULL")}
        in_bundles = {r[0] for r in q("SELECT id FROM image WHERE bundle_id IS NOT NULL")}
        bundles = {r[0] for r in q("SELECT id FROM bundle")}
    return single, in_bundles, bundles


def _check_database(db: Path, tally: Tally, before: tuple[set[str], set[str], set[str]]) -> dict[str, Any]:
    single, in_bundles, bundles = _ids(db)
    # rows of this run only: the database may hold earlier runs'
    uploaded, in_bundles, stored_bundles = single - before[0], in_bundles - before[1], bundles - before[2]
    answered_bundles = tally.bundles
    with _open(db) as conn:
        q = conn.execute
        status = dict(q("SELECT status, count(*) FROM image GROUP BY status").fetchall())
        (attempts,) = q("SELECT count(*) FROM image WHERE attempts > 1").fetchone()
        preds_twice = q(
            "SELECT count(*) FROM (SELECT image_id FROM prediction GROUP BY image_id, model_version_id "
            "HAVING count(*) > 1)"
        ).fetchone()[0]
        done_without = q(
            "SELECT count(*) FROM image i WHERE status='done' AND NOT EXISTS "
            "(SELECT 1 FROM prediction p WHERE p.image_id = i.id)"
        ).fetchone()[0]
        current = q(
            "SELECT count(*) FROM patient p WHERE (SELECT count(*) FROM patient_result r "
            "WHERE r.patient_id = p.id AND r.is_current) != 1 AND EXISTS "
            "(SELECT 1 FROM image i WHERE i.patient_id = p.id)"
        ).fetchone()[0]
        per_bundle = q(
            "SELECT b.id, b.status, group_concat(i.status) FROM bundle b "
            "JOIN image i ON i.bundle_id = b.id GROUP BY b.id"
        ).fetchall()
        stale_bundles = 0
        for _bid, stored, statuses in per_bundle:
            parts = set(statuses.split(","))
            truth = (
                "failed" if parts == {"failed"} else ("done" if parts <= {"done", "failed"} else "running")
            )
            if stored != truth and truth in ("done", "failed"):
                stale_bundles += 1
        jobs = q("SELECT status, total, done, failed FROM scoring_job").fetchall()
    bundle_photo_rows = len(in_bundles)
    return {
        "single uploads answered 2xx": len(tally.images),
        "single-upload rows": len(uploaded),
        "lost (answered, no row)": len(tally.images - uploaded),
        "duplicated (row, never answered 2xx)": len(uploaded - tally.images),
        "bundles answered 202 / rows": f"{len(answered_bundles)} / {len(stored_bundles)}",
        "bundle photographs answered / rows": f"{tally.bundle_photos} / {bundle_photo_rows}",
        "bundles lost / unanswered rows": (
            f"{len(answered_bundles - stored_bundles)} / {len(stored_bundles - answered_bundles)}"
        ),
        "image rows by status (whole database)": status,
        "photographs scored more than once (attempts > 1)": attempts,
        "predictions written twice": preds_twice,
        "done without a prediction": done_without,
        "patients without exactly one current result": current,
        "finished bundles whose stored status is stale": stale_bundles,
        "folder jobs (status, total, done, failed)": jobs,
    }


def _pct(values: list[float], p: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--db", type=Path, required=True, help="the SQLite file the API and workers use")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--patients", type=int, default=30, help="size of the pool of patient ids")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--job-folder", default=None, help="a folder under the import roots to post as a job")
    parser.add_argument("--backup-dir", default="/tmp/drscreen-load-backup")
    parser.add_argument("--drscreen", default="drscreen", help="the drscreen command for the operator")
    parser.add_argument("--no-operator", action="store_true")
    parser.add_argument("--drain", type=float, default=900.0)
    parser.add_argument("--csv-job", default=None, help="a finished job whose results CSV clients download")
    parser.add_argument("--csv-share", type=float, default=0.3, help="share of page reads that are that CSV")
    args = parser.parse_args()

    photos = sorted(args.photos.glob("*.jpg"))[:120]
    tally = Tally()
    before = _ids(args.db)
    until = time.monotonic() + args.seconds
    if args.job_folder:
        r = httpx.post(
            f"{args.api}/v1/jobs",
            headers={"Authorization": f"Bearer {args.key}"},
            json={"folder": args.job_folder},
            timeout=60,
        )
        print(f"folder job: {r.status_code} {r.text[:120]}")
    threads = [
        threading.Thread(target=_client_loop, args=(n, args, photos, tally, until), daemon=True)
        for n in range(args.clients)
    ]
    threads.append(
        threading.Thread(target=_wal_watch, args=(args.db, tally, until + args.drain), daemon=True)
    )
    if not args.no_operator:
        threads.append(threading.Thread(target=_operator_loop, args=(args, tally, until), daemon=True))
    for t in threads:
        t.start()
    for t in threads[: args.clients]:
        t.join()
    waited = _drain(args.db, args.drain)
    time.sleep(1.0)
    requests = sum(tally.answers.values())
    print(
        f"\n{args.clients} clients for {args.seconds:.0f} s: {requests} requests; "
        f"queue drained in {waited:.0f} s"
    )
    print("\nanswers by kind:")
    for key, count in sorted(tally.answers.items()):
        print(f"  {count:6d}  {key}")
    for key, body in sorted(tally.details.items()):
        print(f"  e.g. {key}: {body}")
    print("\nlatency (s): p50 / p95 / max")
    for kind, values in sorted(tally.latency.items()):
        print(
            f"  {kind:40s} {_pct(values, 50):7.2f} {_pct(values, 95):7.2f} {max(values):7.2f}"
            f"  (n={len(values)})"
        )
    print("\noperator commands:")
    for key, count in sorted(tally.operator.items()):
        print(f"  {count:4d}  {key}")
    for line in tally.operator_errors[:5]:
        print(f"  ! {line}")
    print(f"\nlargest WAL file seen: {tally.wal_max / 1e6:.1f} MB")
    print("\ndatabase:")
    for key, value in _check_database(args.db, tally, before).items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
