"""The Prometheus alerting rules shipped for operators (deploy/prometheus/alerts.yml): valid, each
alert fires on its situation and not beside it (promtool's rule unit tests), and every metric and
label value they name is one the API's /metrics really exposes (a renamed metric would leave an
alert silent forever)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from tests.conftest import REPO_ROOT

RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.test.yml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:  # CI installs it (.ci/run); a missing tool must not pass silently
        pytest.fail(
            "promtool not found: apt-get install prometheus (Debian), see README 'Tests'", pytrace=False
        )
    return found


@pytest.mark.parametrize("command", [["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]])
def test_promtool_accepts_the_rules_and_their_unit_tests_pass(command: list[str]) -> None:
    done = subprocess.run([_promtool(), *command], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _not_exposed(rules: str, scraped: str) -> list[str]:
    """The metrics, and metric{label="value"} selectors, of ``rules`` that ``scraped`` lacks."""
    exposed = set(re.findall(r"^(drscreen_\w+)", scraped, flags=re.MULTILINE))
    exposed |= set(re.findall(r"^# TYPE (drscreen_\w+)", scraped, flags=re.MULTILINE))
    missing = sorted(set(re.findall(r"\b(drscreen_[a-z_]+)\b(?=\s*[{\[)])", rules)) - exposed)
    for metric, label, value in re.findall(r'(drscreen_\w+)\{(\w+)="([^"]+)"\}', rules):
        if f'{metric}{{{label}="{value}"}}' not in scraped:
            missing.append(f'{metric}{{{label}="{value}"}}')
    return missing


@pytest.fixture
def scraped(client: TestClient, url: str) -> str:
    client.get("/healthz")  # one request, so the request counter has a sample
    return client.get("/metrics").text


def test_every_metric_and_label_the_rules_name_is_exposed(scraped: str) -> None:
    rules = RULES.read_text(encoding="utf-8")
    assert len(re.findall(r"- alert: ", rules)) == 11
    assert _not_exposed(rules, scraped) == []


def test_a_renamed_metric_or_label_value_is_caught(scraped: str) -> None:
    rules = RULES.read_text(encoding="utf-8")
    renamed = rules.replace("drscreen_workers_live)", "drscreen_workers_alive)")
    assert _not_exposed(renamed, scraped) == ["drscreen_workers_alive"]
    relabelled = rules.replace('{status="queued"}', '{status="waiting"}')
    assert _not_exposed(relabelled, scraped) == ['drscreen_images{status="waiting"}']
