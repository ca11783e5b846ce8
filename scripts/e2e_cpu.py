"""Where the end-to-end CPU goes: core-milliseconds per photograph, by process, for one folder job.

    python scripts/e2e_cpu.py [--images 240] [--concurrency 2] [--spy DIR]

Starts the same embedded service as ``drscreen bench`` (API, worker with its pool children, file
broker, SQLite), runs a warm-up job, then one folder job of N distinct photographs without
heatmaps, and reads each process's user+system CPU time from /proc before and after. CPU time,
unlike wall time, is attributable per process, so the table says which process to make cheaper
(docs/performance.md). The bench's own client (this process) is counted too. With ``--spy``,
py-spy samples every pool child during the job and the samples are summed by stage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli.bench import make_folder, photo_sources, run_job, running_service  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included, reaped children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *descendants(kid)]
    return out


def snapshot(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds per labelled process and per descendant of the service's processes."""
    snap: dict[str, float] = {}
    for label, pid in roots.items():
        snap[label] = cpu_seconds(pid)
        if label == "client":  # its children are the service's processes, counted on their own
            continue
        for kid in descendants(pid):
            try:
                snap[f"{label} child {kid}"] = cpu_seconds(kid)
            except OSError:
                continue
    return snap


#: innermost frame name fragments -> stage (the first match, in this order, wins)
STAGES = (
    ("assess_quality", "quality gate"),
    ("pixel_inputs", "preprocess"),
    ("decode_image", "decode"),
    ("member_probabilities", "forward"),
    ("expand_folder", "folder expansion"),
    ("_write", "database write"),
    ("_claim", "database claim"),
)


def start_spies(pids: list[int], out: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                "record",
                "-p",
                str(pid),
                "-r",
                "100",
                "-f",
                "raw",
                "-o",
                str(out / f"{pid}.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]


def stage_shares(raw: Path) -> Counter[str]:
    """Samples per stage in one py-spy raw file (lines: 'frame;frame;... count')."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        # py-spy records only threads that are running (no --idle), so every sample is CPU work
        stage = next((name for key, name in STAGES if key in stack), "other (celery, broker)")
        counts[stage] += int(n)
    return counts


class IdleSampler:
    """Samples each pool child's CPU time every ``period`` s; a sample under half a core is idle."""

    def __init__(self, pids: list[int], period: float = 0.1) -> None:
        self.pids, self.period = pids, period
        self.samples: list[tuple[float, list[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), [cpu_seconds(p) for p in self.pids]))
            self._stop.wait(self.period)

    def __enter__(self) -> IdleSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        """Idle seconds per child, split into the first second, the last second and the middle."""
        t_first, t_last = self.samples[0][0], self.samples[-1][0]
        lines = []
        for k, pid in enumerate(self.pids):
            idle: dict[str, float] = {"start": 0.0, "middle": 0.0, "end": 0.0}
            for (t0, a), (t1, b) in zip(self.samples, self.samples[1:], strict=False):
                if b[k] - a[k] < 0.5 * (t1 - t0):
                    part = "start" if t0 - t_first < 1 else "end" if t_last - t1 < 1 else "middle"
                    idle[part] += t1 - t0
            lines.append(
                f"child {pid} idle s: " + ", ".join(f"{p} {idle[p]:.2f}" for p in ("start", "middle", "end"))
            )
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--spy", type=Path, help="sample the pool children with py-spy into DIR")
    args = parser.parse_args()
    import httpx

    sources = photo_sources()
    root = Path(tempfile.mkdtemp(prefix="drscreen-e2e-cpu-"))
    try:
        imports = root / "photos"
        warm = make_folder(imports / "warm", sources, 16, "warm")
        job = make_folder(imports / "job", sources, args.images, "job")
        with running_service(root, imports, args.concurrency) as service:
            headers = {"Authorization": f"Bearer {service.key}"}
            with httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as client:
                run_job(service, client, warm, explain=False)
                roots = {"api": service.procs[0].pid, "worker": service.worker.pid, "client": os.getpid()}
                spies = []
                if args.spy:
                    args.spy.mkdir(parents=True, exist_ok=True)
                    spies = start_spies(descendants(service.worker.pid), args.spy)
                before = snapshot(roots)
                t0 = time.perf_counter()
                with IdleSampler(descendants(service.worker.pid)) as idle:
                    secs = run_job(service, client, job, explain=False)
                wall = time.perf_counter() - t0
                after = snapshot(roots)
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
        total = 0.0
        print(f"{args.images} photographs in {secs:.2f} s = {args.images / secs:.2f} images/s")
        print(f"{'process':<28} {'cpu s':>7} {'core-ms/photo':>14} {'share of wall':>14}")
        for label, end in sorted(after.items()):
            spent = end - before.get(label, 0.0)
            total += spent
            print(f"{label:<28} {spent:7.2f} {1000 * spent / args.images:14.1f} {spent / wall:14.0%}")
        print(f"{'total':<28} {total:7.2f} {1000 * total / args.images:14.1f} {total / wall:14.0%}")
        print(idle.report())
        for raw in sorted(args.spy.glob("*.txt")) if args.spy else []:
            counts = stage_shares(raw)
            total_n = sum(counts.values()) or 1
            print(
                f"py-spy {raw.stem}: " + ", ".join(f"{k} {v / total_n:.0%}" for k, v in counts.most_common())
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
