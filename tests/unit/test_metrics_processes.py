"""``drscreen serve --workers 2``: every scrape of /metrics counts every process's requests (the
review: each process counted its own, so a scrape read whichever answered, and the counters went
up and down between scrapes). A real ``drscreen serve`` subprocess on the embedded database."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT

HEALTHZ = re.compile(
    r'^drscreen_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', re.MULTILINE
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_two_api_processes_report_one_request_count(url: str, tmp_path: Path) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers", "2"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(cli, cwd=REPO_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    asked = 0
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                asked += 1
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                asked -= 1  # never reached a process: not counted
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        time.sleep(3)  # the second process up too
        with httpx.Client(base_url=base, timeout=10) as client:  # new connections: both processes answer
            for _ in range(40):
                assert client.get("/healthz", headers={"Connection": "close"}).status_code == 200
                asked += 1
            counts = []
            for _ in range(8):
                scrape = client.get("/metrics", headers={"Connection": "close"}).text
                found = HEALTHZ.search(scrape)
                assert found, scrape[:2000]
                counts.append(float(found.group(1)))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert counts == [float(asked)] * len(counts), (counts, asked)
    assert "drscreen_workers_live" in scrape  # the database's gauges are still there, once
    assert len(re.findall(r"^# TYPE drscreen_workers_live gauge$", scrape, re.M)) == 1
