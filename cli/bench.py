"""``drscreen bench [--json] [--quick]``: how fast the shipped ensemble scores real photographs.

Figures (the last line with ``--json`` is one JSON object holding all of them):

- ``forward_ips_torch`` / ``forward_ips_onnx``: ensemble images/s on pre-decoded, pre-processed
  tensors at batch 8 (PyTorch: the best of the settings tried, listed under ``torch_settings``;
  ONNX Runtime and OpenVINO: the median of ``runtime_processes`` fresh processes, each run's figure
  under ``forward_ips_<runtime>_runs``);
- ``latency_ms_torch_b1`` / ``latency_ms_onnx_b1``: one image through the ensemble (median);
- ``forward_ips_openvino`` / ``latency_ms_openvino_b1`` (``openvino_precision``): the same ONNX
  graphs run by OpenVINO, bfloat16 where `drscreen export onnx` accepted it for these weights;
  ``forward_ips_torch_bf16``: PyTorch's best setting under bfloat16 autocast, the like-for-like
  comparison for a bfloat16 figure (reduced precision: not a candidate for ``forward_ips_torch``);
- ``e2e_ips``: a folder job of real photographs through the API, the broker, a worker and the
  database, explanations off (timed from ``POST /v1/jobs`` to the job's ``done``);
- ``e2e_ips_explain``: the same with explanations on (until every heatmap is stored);
- ``scaling_ratio``: seconds per image of a large job over those of a small one;
- ``worker_rss_mb``: peak resident memory of the worker's pool child (ensemble loaded, scoring);
- ``api_p95_ms``: single-image ``POST /v1/images?wait=30`` requests from 4 concurrent clients;
- ``explain_forward_passes`` (PyTorch) and ``explain_forward_passes_<runtime>``: one heatmap's
  time (``Ensemble.explain``, the explain queue's task) over one forward pass of the same
  photograph, preprocessing included in both;
- ``explain_in_pass_forward_passes_<runtime>``: ``predict`` of one photograph with its heatmap
  over ``predict`` without it (the CPU runtimes draw it from the grading pass's feature maps).

The API (``drscreen serve``) and the worker (``drscreen worker``) run as subprocesses on a fresh
embedded installation (SQLite, file broker, file store) in a temporary folder, with the runtime
and thread settings of this environment (``DRSCREEN_RUNTIME``...). Every photograph is a real
natural-colour fundus photograph; repeated ones get a JPEG comment so their bytes differ (the store
would otherwise dedupe them). Heavy imports happen inside the functions (``drscreen --help`` stays
instant).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# empty counts as unset, as for every DRSCREEN_ name (ml.environment.env_setting; cli imports no
# ml at module level)
# default: the natural-colour EyePACS photographs beside the checkout (../shared/data, as the
# training configs); any folder of JPEG photographs (subfolders too) will do
NATURAL = Path(
    os.environ.get("DRSCREEN_BENCH_PHOTOS", "").strip()
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "eyepacs-natural-512" / "images"
)
BATCH = 8


@dataclass(frozen=True)
class Plan:
    """How much work each figure gets (``--quick`` shrinks everything)."""

    forward_repeats: int = 5
    latency_repeats: int = 15
    e2e_images: int = 240
    explain_images: int = 200
    scaling_small: int = 100
    scaling_large: int = 1000
    api_requests: int = 100
    api_clients: int = 4
    compile: bool = True
    runtime_processes: int = 3


QUICK = Plan(
    forward_repeats=2,
    latency_repeats=3,
    e2e_images=24,
    explain_images=8,
    scaling_small=8,
    scaling_large=24,
    api_requests=8,
    compile=False,
    runtime_processes=1,
)


# ------------------------------------------------------------------------------ figures (pure)


def images_per_second(n_images: int, seconds: float) -> float:
    return n_images / seconds if seconds > 0 else float("inf")


def scaling_ratio(small: tuple[int, float], large: tuple[int, float]) -> float:
    """(images, seconds) of a large job vs a small one: seconds per image, large ÷ small."""
    return (large[1] / large[0]) / (small[1] / small[0])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def forward_key(runtime: str) -> str:
    """The forward figure of the runtime the service's worker used (``e2e_over_forward``'s divisor)."""
    return {"onnx": "forward_ips_onnx", "openvino": "forward_ips_openvino"}.get(runtime, "forward_ips_torch")


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (ONNX Runtime and oneDNN pick kernels on the first call)
    return min(_timed(fn) for _ in range(max(1, repeats)))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return statistics.median(_timed(fn) for _ in range(max(1, repeats)))


def summarise_runtime_runs(runtime: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one runtime from its fresh-process runs: medians, and every run's figure."""
    ips = [r["forward_ips"] for r in runs]
    out: dict[str, Any] = {
        f"forward_ips_{runtime}": statistics.median(ips),
        f"forward_ips_{runtime}_runs": [round(v, 2) for v in ips],
        f"latency_ms_{runtime}_b1": statistics.median(r["latency_ms_b1"] for r in runs),
        f"explain_ms_{runtime}": statistics.median(r["explain_ms"] for r in runs),
        f"explain_forward_passes_{runtime}": statistics.median(r["explain_forward_passes"] for r in runs),
        f"explain_in_pass_ms_{runtime}": statistics.median(r["explain_in_pass_ms"] for r in runs),
        f"explain_in_pass_forward_passes_{runtime}": statistics.median(
            r["explain_in_pass_forward_passes"] for r in runs
        ),
    }
    if runtime == "openvino":
        from ml.inference.openvino_runtime import bf16_kernels

        out["openvino_precision"] = runs[0]["precision"]
        out["bf16_kernels"] = bf16_kernels()  # which verdict chose the precisions
    return out


def explain_cost(ens: Any, photo: Any, repeats: int) -> dict[str, float]:
    """One heatmap's time (median) and that time over one forward pass of the same photograph,
    preprocessing included in both."""
    explain_s = median_time(lambda: ens.explain(photo), repeats)
    forward_s = median_time(lambda: ens.member_probabilities(ens.pixel_inputs([photo])), repeats)
    return {"explain_ms": 1000 * explain_s, "explain_forward_passes": explain_s / forward_s}


def explain_in_pass_cost(ens: Any, photo: Any, repeats: int) -> dict[str, float]:
    """``predict`` of one photograph with its heatmap (median), and that over ``predict`` without."""
    with_map_s = median_time(lambda: ens.predict([photo], heatmaps=[True]), repeats)
    plain_s = median_time(lambda: ens.predict([photo]), repeats)
    return {"explain_in_pass_ms": 1000 * with_map_s, "explain_in_pass_forward_passes": with_map_s / plain_s}


def runtime_forward(runtime: str, forward_repeats: int, latency_repeats: int) -> dict[str, Any]:
    """Forward figures of the shipped ensemble's ONNX graphs under ``runtime`` in this process:
    images/s at batch 8 (best of ``forward_repeats``) and the median batch-1 latency."""
    from core.settings import get_settings
    from ml.imageio import decode_image
    from ml.inference import load_ensemble

    settings = get_settings()
    cpus = os.cpu_count() or 1
    ens = load_ensemble(settings.model, models_dir=settings.models_dir, runtime=runtime, threads=cpus)
    sessions = ens.runtime
    assert sessions is not None
    photos = [decode_image(p.read_bytes()) for p in photo_sources()[:BATCH]]
    inputs = ens.pixel_inputs(photos)
    one = {k: v[:1] for k, v in inputs.items()}

    def forward(xs: dict[str, Any]) -> None:
        sessions.run_many(ens.members, xs)

    out: dict[str, Any] = {
        "forward_ips": images_per_second(BATCH, best_time(lambda: forward(inputs), forward_repeats)),
        "latency_ms_b1": 1000 * median_time(lambda: forward(one), latency_repeats),
    }
    # a heatmap on this runtime: drawn apart (the explain task), and with the grade (scoring)
    out.update(explain_cost(ens, photos[0], latency_repeats))
    out.update(explain_in_pass_cost(ens, photos[0], latency_repeats))
    if runtime == "openvino":
        out["precision"] = {ref: s.precision for ref, s in sessions.sessions.items()}
    return out


def runtime_forward_subprocess(runtime: str, plan: Plan) -> dict[str, Any]:
    """:func:`runtime_forward` in a fresh Python process (no torch threads or compiled graphs
    around, as in a worker's pool child); its figures come back as the last line of its output."""
    code = (
        "import json, sys; from cli.bench import runtime_forward; "
        "print(json.dumps(runtime_forward(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))"
    )
    args = [runtime, str(plan.forward_repeats), str(plan.latency_repeats)]
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=dict(os.environ)
    )
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} forward in a subprocess failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def distinct_jpeg(data: bytes, tag: str) -> bytes:
    """The same JPEG with a comment segment (COM) after SOI: decodes to the same pixels, other bytes."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    comment = tag.encode()
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]


def photo_sources(folder: Path = NATURAL) -> list[Path]:
    """The JPEG photographs under ``folder`` (the bench's copies differ by a JPEG comment)."""
    photos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg") and p.is_file())
    if len(photos) < BATCH:  # the forward figures divide a batch of BATCH distinct photographs
        found = f"{len(photos)} photographs" if photos else "no photographs"
        raise SystemExit(
            f"drscreen bench: {found} under {folder} (DRSCREEN_BENCH_PHOTOS), at least {BATCH} needed"
        )
    return photos


def machine_description(sources: list[Path]) -> dict[str, Any]:
    """What the figures depend on besides the code: the CPU (model, the vector extensions the
    runtimes pick kernels by, the cores this process may use), library versions, the commit, and
    the size of the photographs (the service figures scale with it: 512-px copies here, while a
    camera's originals cost several times as much to decode and check)."""
    import platform
    from importlib import metadata

    from PIL import Image

    cpu = {"model": platform.processor() or platform.machine(), "flags": []}
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
        flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
        cpu = {"model": names[0] if names else cpu["model"], "flags": [f for f in wanted if f in flags]}
    versions: dict[str, str | None] = {}
    for package in ("torch", "onnxruntime", "openvino"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    from ml.release import code_commit

    commit = code_commit()  # None without git (the worker image has none): the figures still come
    sizes = []
    for path in sources[:32]:
        with contextlib.suppress(OSError), Image.open(path) as im:
            sizes.append(max(im.size))
    return {
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "versions": versions,
        "commit": commit,
        "photos_distinct": len(sources),
        "photo_long_side_px": int(statistics.median(sizes)) if sizes else None,
    }


def make_folder(dst: Path, sources: list[Path], n: int, tag: str) -> Path:
    """``n`` distinct photographs named ``<tag>p<i>_<left|right>.jpeg`` (EyePACS naming)."""
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        eye = "left" if i % 2 == 0 else "right"
        (dst / f"{tag}p{i // 2}_{eye}.jpeg").write_bytes(distinct_jpeg(src.read_bytes(), f"{tag}-{i}"))
    return dst


# --------------------------------------------------------------------------- model-level figures


def forward_figures(plan: Plan, sources: list[Path], log: Callable[[str], None]) -> dict[str, Any]:
    """Ensemble forward speed on pre-processed photographs: PyTorch settings vs ONNX Runtime."""
    import torch

    from core.settings import get_settings
    from ml.imageio import decode_image
    from ml.inference import load_ensemble

    settings = get_settings()
    cpus = os.cpu_count() or 1
    ens = load_ensemble(settings.model, models_dir=settings.models_dir)
    images = [decode_image(p.read_bytes()) for p in sources[:BATCH]]
    inputs = ens.pixel_inputs(images)
    one = {k: v[:1] for k, v in inputs.items()}
    members = ens.member_objects
    out: dict[str, Any] = {"ensemble": ens.ref, "members": ens.members, "cpus": cpus}

    pool = ThreadPoolExecutor(cpus)

    def torch_forward(
        xs: dict[str, Any], channels_last: bool, pieces: bool = False, bf16: bool = False
    ) -> None:
        """Every member on its input; with ``pieces``, (member, half batch) pieces run on a pool of
        ``cpus`` threads (single-threaded ops), the way the ONNX Runtime path runs."""

        def run(model: Any, x: Any) -> None:
            # autocast is per thread: entered here, inside each piece
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                t = torch.from_numpy(x)
                if channels_last:
                    t = t.contiguous(memory_format=torch.channels_last)
                model(t)

        if not pieces:
            for m in members:
                run(m.model, xs[m.ref])
            return
        futures = []
        for m in members:
            x = xs[m.ref]
            half = max(1, len(x) // 2)
            futures += [pool.submit(run, m.model, part) for part in (x[:half], x[half:]) if len(part)]
        for f in futures:
            f.result()

    settings_tried: dict[str, float] = {}
    variants = [(t, cl, False) for t in sorted({1, cpus}) for cl in (False, True)]
    variants += [(1, cl, True) for cl in (False, True)] if cpus > 1 else []
    for threads, channels_last, pieces in variants:
        torch.set_num_threads(threads)
        for m in members:
            m.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        secs = best_time(partial(torch_forward, inputs, channels_last, pieces), plan.forward_repeats)
        key = f"threads={threads},channels_last={channels_last},inference_mode"
        key += f",{cpus} member pieces in parallel" if pieces else ""
        settings_tried[key] = images_per_second(BATCH, secs)
        log(f"  torch {key}: {settings_tried[key]:.2f} images/s")
    best = max(settings_tried, key=lambda k: settings_tried[k])
    threads = int(best.split(",")[0].split("=")[1])
    channels_last = "channels_last=True" in best
    pieces = "pieces" in best
    torch.set_num_threads(threads)
    for m in members:
        m.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    eager = {m.ref: m.model for m in members}
    if plan.compile:
        # torch.compile (inductor, C++ kernels): ~1-2 min per member on 2 cores, cached afterwards
        t_compile = time.perf_counter()
        for m in members:
            m.model = torch.compile(eager[m.ref])  # type: ignore[assignment]
        secs = best_time(partial(torch_forward, inputs, channels_last, pieces), plan.forward_repeats)
        out["torch_compile_seconds"] = time.perf_counter() - t_compile
        key = best + ",torch.compile"
        settings_tried[key] = images_per_second(BATCH, secs)
        log(f"  torch {key}: {settings_tried[key]:.2f} images/s")
        if settings_tried[key] > settings_tried[best]:
            best = key
        else:
            for m in members:
                m.model = eager[m.ref]
    out["torch_settings"] = settings_tried
    out["torch_best_setting"] = best
    out["forward_ips_torch"] = settings_tried[best]
    # Batch 1 on the eager members (a compiled graph would recompile for the new batch size), and
    # Grad-CAM below uses the eager members too, as the workers do.
    for m in members:
        m.model = eager[m.ref]
    out["latency_ms_torch_b1"] = 1000 * min(
        median_time(lambda: torch_forward(one, channels_last), plan.latency_repeats),
        median_time(lambda: torch_forward(one, channels_last, pieces), plan.latency_repeats),
    )
    bf16_secs = best_time(partial(torch_forward, inputs, channels_last, pieces, True), plan.forward_repeats)
    out["forward_ips_torch_bf16"] = images_per_second(BATCH, bf16_secs)
    eager_best = best.replace(",torch.compile", "")
    log(f"  torch {eager_best},bf16 autocast: {out['forward_ips_torch_bf16']:.2f} images/s")

    # ONNX Runtime and OpenVINO each in fresh processes, several times: in this process (after
    # torch and its compiled graphs) the OpenVINO figure swung between 41 and 65 images/s from one
    # run to the next (session 13); the figure is the median of the processes, all listed.
    out["onnx_threads"] = cpus
    for runtime in ("onnx", "openvino"):
        runs = [runtime_forward_subprocess(runtime, plan) for _ in range(plan.runtime_processes)]
        out.update(summarise_runtime_runs(runtime, runs))
        log(f"  {runtime} in {len(runs)} fresh processes: {out[f'forward_ips_{runtime}_runs']} images/s")
    out["onnx_speedup"] = out["forward_ips_onnx"] / out["forward_ips_torch"]

    # Explanations on PyTorch (GPU workers, or DRSCREEN_RUNTIME=torch): Grad-CAM of every member
    # (the backbone without autograd + the head's backward) relative to one ensemble forward of
    # the same single image. The CPU runtimes' figures come from their fresh processes above.
    torch.set_num_threads(cpus)
    out.update(explain_cost(ens, images[0], plan.latency_repeats))
    return out


# ----------------------------------------------------------------------------- the live service


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drscreen() -> list[str]:
    exe = Path(sys.executable).with_name("drscreen")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]


class Service:
    """API + worker subprocesses on a temporary embedded installation."""

    def __init__(self, root: Path, imports: Path, concurrency: int) -> None:
        from core import migrate
        from core import repository as repo
        from core.db import session_scope
        from core.settings import Settings

        self.root = root
        self.settings = Settings(var_dir=root / "var", import_roots=str(imports))
        self.env = dict(os.environ)
        self.env.update(
            {
                "DRSCREEN_VAR_DIR": str(self.settings.var_dir),
                "DRSCREEN_DATABASE_URL": self.settings.database_url,
                "DRSCREEN_BROKER_URL": self.settings.broker_url,
                "DRSCREEN_STORE_DIR": str(self.settings.store_path),
                "DRSCREEN_IMPORT_ROOTS": str(imports),
                "DRSCREEN_MODELS_DIR": str(self.settings.models_dir),
                "DRSCREEN_RATE_LIMIT_PER_MINUTE": "0",  # the bench is one client sending a lot
                "DRSCREEN_LOG_LEVEL": "WARNING",
            }
        )
        # share the ONNX cache of this checkout (exported once, by `drscreen export onnx`)
        from ml.inference.onnx_runtime import cache_dir as onnx_cache_dir

        self.env["DRSCREEN_ONNX_CACHE"] = str(onnx_cache_dir().resolve())
        migrate.upgrade(self.settings.database_url)
        with session_scope(self.settings.database_url) as session:
            clinic = repo.get_or_create_clinic(session, "Bench clinic")
            _row, self.key = repo.create_api_key(session, clinic, label="drscreen bench")
        self.port = _free_port()
        self.concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker_log = root / "worker.log"

    def start(self, timeout: float = 300.0) -> None:
        api_log = open(self.root / "api.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(
                [*_drscreen(), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=api_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        worker_log = open(self.worker_log, "wb")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [*_drscreen(), "worker", "--concurrency", str(self.concurrency), "--loglevel", "WARNING"],
            env=self.env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(self.worker)
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a bench subprocess exited ({p.args!r}); logs in {self.root}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code < 500 and self._children():
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the bench service did not start in {timeout:.0f}s (logs in {self.root})")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _children(self) -> list[int]:
        """Pool children of the worker (they hold the ensemble)."""
        try:
            text = Path(f"/proc/{self.worker.pid}/task/{self.worker.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def child_rss_mb(self, field: str = "VmRSS") -> float:
        best = 0.0
        for pid in self._children():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        best = max(best, int(line.split()[1]) / 1024)
        return best

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@contextlib.contextmanager
def running_service(root: Path, imports: Path, concurrency: int) -> Iterator[Service]:
    service = Service(root, imports, concurrency)
    try:
        service.start()
        yield service
    finally:
        service.stop()


def _heatmaps_left(service: Service, job_id: str) -> int:
    """The job's graded, gradable photographs without a heatmap yet (ungradable ones get none: a
    wait for one heatmap per file never ended on a folder holding an ungradable photograph)."""
    from sqlalchemy import func, select

    from core.db import session_scope
    from core.tables import Explanation, Image

    with session_scope(service.settings.database_url) as session:
        drawn = select(Explanation.image_id).where(Explanation.image_id == Image.id).exists()
        q = select(func.count()).select_from(Image).where(Image.job_id == job_id, Image.gradable.is_(True))
        return int(session.scalar(q.where(~drawn)) or 0)


def run_job(service: Service, client: Any, folder: Path, explain: bool, timeout: float = 3600) -> float:
    """Seconds from submitting a folder job to its last grade (and last heatmap with ``explain``)."""
    n = sum(1 for _ in folder.iterdir())
    t0 = time.perf_counter()
    resp = client.post("/v1/jobs", json={"folder": str(folder), "explain": explain})
    resp.raise_for_status()
    job_id = resp.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            # a failed job with no failed photograph (a refused folder, an expansion that died) was
            # timed as a finished one: a few photographs' time read as the whole job's
            if job["status"] == "failed" or job["failed"] or job["done"] != n:
                raise RuntimeError(
                    f"bench job {job_id} ended {job['status']} with {job['done']} of {n} photographs "
                    f"done and {job['failed']} failed: no figure from it"
                )
            if not explain or _heatmaps_left(service, job_id) == 0:
                return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"bench job {job_id} did not finish in {timeout:.0f}s")
        time.sleep(0.1)


def api_latencies(service: Service, sources: list[Path], n: int, clients: int) -> list[float]:
    """Milliseconds of ``n`` single-image ``wait`` requests from ``clients`` concurrent clients."""
    import httpx

    headers = {"Authorization": f"Bearer {service.key}"}
    payloads = [distinct_jpeg(sources[i % len(sources)].read_bytes(), f"api-{i}") for i in range(n)]
    local = threading.local()

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=service.base_url, headers=headers, timeout=60)
        t0 = time.perf_counter()
        resp = local.client.post(
            "/v1/images",
            params={"wait": 30},
            data={"patient_id": f"api{i}", "eye": "left"},
            files={"file": (f"api{i}.jpeg", payloads[i], "image/jpeg")},
        )
        elapsed = 1000 * (time.perf_counter() - t0)
        if resp.status_code != 200:
            raise RuntimeError(f"POST /v1/images?wait=30 -> {resp.status_code}: {resp.text[:300]}")
        return elapsed

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(n)))


class _RssSampler:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.service.child_rss_mb())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.service.child_rss_mb("VmHWM"))


def service_figures(plan: Plan, sources: list[Path], log: Callable[[str], None]) -> dict[str, Any]:
    import httpx

    from core.settings import get_settings
    from workers.model import resolve_runtime

    settings = get_settings()
    # 2 cores: two pool children of one intra-op thread each beat one child of two threads
    # (docs/performance.md); DRSCREEN_BENCH_CONCURRENCY overrides.
    concurrency = int(os.environ.get("DRSCREEN_BENCH_CONCURRENCY", "0") or 0) or (os.cpu_count() or 1)
    out: dict[str, Any] = {"runtime": resolve_runtime(settings), "worker_concurrency": concurrency}
    root = Path(tempfile.mkdtemp(prefix="drscreen-bench-"))
    try:
        imports = root / "photos"
        folders = {
            "warm": make_folder(imports / "warm", sources, 16, "warm"),
            "e2e": make_folder(imports / "e2e", sources, plan.e2e_images, "e2e"),
            "small": make_folder(imports / "small", sources, plan.scaling_small, "small"),
            "large": make_folder(imports / "large", sources, plan.scaling_large, "large"),
            "explain": make_folder(imports / "explain", sources, plan.explain_images, "explain"),
        }
        with running_service(root, imports, concurrency) as service:
            headers = {"Authorization": f"Bearer {service.key}"}
            with (
                httpx.Client(base_url=service.base_url, headers=headers, timeout=60) as client,
                _RssSampler(service) as rss,
            ):
                run_job(service, client, folders["warm"], explain=False)
                secs = run_job(service, client, folders["e2e"], explain=False)
                out["e2e_images"] = plan.e2e_images
                out["e2e_ips"] = images_per_second(plan.e2e_images, secs)
                log(f"  e2e: {plan.e2e_images} photographs in {secs:.1f}s = {out['e2e_ips']:.2f}/s")
                small = run_job(service, client, folders["small"], explain=False)
                large = run_job(service, client, folders["large"], explain=False)
                out["scaling_jobs"] = {
                    "small": [plan.scaling_small, small],
                    "large": [plan.scaling_large, large],
                }
                out["scaling_ratio"] = scaling_ratio((plan.scaling_small, small), (plan.scaling_large, large))
                log(f"  scaling: {plan.scaling_small} in {small:.1f}s, {plan.scaling_large} in {large:.1f}s")
                secs = run_job(service, client, folders["explain"], explain=True)
                out["e2e_explain_images"] = plan.explain_images
                out["e2e_ips_explain"] = images_per_second(plan.explain_images, secs)
                log(f"  e2e with heatmaps: {plan.explain_images} in {secs:.1f}s")
                lat = api_latencies(service, sources, plan.api_requests, plan.api_clients)
                out["api_requests"] = len(lat)
                out["api_p50_ms"] = percentile(lat, 50)
                out["api_p95_ms"] = percentile(lat, 95)
            out["worker_rss_mb"] = rss.peak
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def run_bench(as_json: bool, quick: bool = False) -> int:
    """Measure and print every figure; with ``as_json`` the last line is one JSON object."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if quick else Plan()
    sources = photo_sources()

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.perf_counter()
    kind = "quick" if quick else "full"
    machine = machine_description(sources)
    log(
        f"drscreen bench ({kind}) on {machine['cpus_usable']} usable CPUs ({machine['cpu_model']}; "
        f"{' '.join(machine['cpu_flags']) or 'no AVX2'}), commit {machine['commit']}, "
        f"{len(sources)} photographs, long side {machine['photo_long_side_px']} px"
    )
    figures: dict[str, Any] = {"quick": quick, "machine": machine}
    # The service first: what the model figures leave in this process (torch's OpenMP pool,
    # inductor's compile workers) measurably slowed the worker subprocesses that followed.
    log("service (API + broker + worker + database):")
    figures.update(service_figures(plan, sources, log))
    log("model forward (pre-decoded photographs, batch 8):")
    figures.update(forward_figures(plan, sources, log))
    for key in (
        "forward_ips_torch",
        "forward_ips_onnx",
        "forward_ips_openvino",
        "forward_ips_torch_bf16",
        "latency_ms_torch_b1",
        "latency_ms_onnx_b1",
        "latency_ms_openvino_b1",
    ):
        log(f"  {key}: {figures[key]:.2f}")
    figures["e2e_over_forward"] = figures["e2e_ips"] / figures[forward_key(figures["runtime"])]
    figures["bench_seconds"] = time.perf_counter() - t0
    for key in (
        "e2e_ips",
        "e2e_ips_explain",
        "scaling_ratio",
        "worker_rss_mb",
        "api_p95_ms",
        "explain_forward_passes",
        "explain_forward_passes_onnx",
        "explain_forward_passes_openvino",
    ):
        log(f"  {key}: {figures[key]:.2f}")
    if as_json:  # strict JSON: a figure that could not be measured is null, never Infinity/NaN
        from ml.evaluation import nan_to_none

        print(json.dumps(nan_to_none(figures), default=float, allow_nan=False), flush=True)
    return 0
