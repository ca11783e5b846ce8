"""``Idempotency-Key`` races on real PostgreSQL and Redis, through the app (no worker needed): two
requests with one key really at the same time (both look the key up before either commits, and the
second writes its key while the first's is still uncommitted) create one resource and one scoring
task; the same key with another request at the same time is a conflict; a key is free again after
24 h. The scenarios are in tests/idempotency_race.py (the same ones run on SQLite in
tests/unit/test_idempotency.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.settings import get_settings
from services.app import create_app
from tests.api_support import Key, make_key
from tests.idempotency_race import (
    expired_key_used_again,
    install_race,
    other_request_at_once,
    same_request_twice_at_once,
    scoring_task_images,
)

#: A Redis database of its own (test_api_pipeline uses 11, the web UI tests 12): its queue is read here.
BROKER_DB = 13


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{BROKER_DB}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def client(
    pg_url: str, broker: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    kwargs = broker.connection_pool.connection_kwargs
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", pg_url)
    monkeypatch.setenv("DRSCREEN_BROKER_URL", f"redis://{kwargs['host']}:{kwargs['port']}/{BROKER_DB}")
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(tmp_path / "store"))
    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        yield c


@pytest.fixture
def key(pg_url: str) -> Key:
    # a clinic of its own: the session's database is shared with other tests
    return make_key(pg_url, f"Idem-{uuid.uuid4().hex[:8]}")


def _queued(broker: redis.Redis) -> list[list[str]]:
    tasks = []
    # uploads are queued on ``uploads`` (session 32); anything else scoring on ``scoring``
    for name in [*broker.scan_iter("uploads*"), *broker.scan_iter("scoring*")]:
        if broker.type(name) == b"list":
            tasks += [scoring_task_images(m) for m in broker.lrange(name, 0, -1)]
    return [t for t in tasks if t is not None]


@pytest.mark.parametrize("kind", ["image", "bundle"])
def test_one_key_twice_at_once_creates_and_queues_one(
    client: TestClient,
    pg_url: str,
    key: Key,
    broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    race = install_race(monkeypatch)
    same_request_twice_at_once(client, pg_url, key, race, lambda: _queued(broker), kind)
    # the second request wrote its key while the first one's was written and not yet committed
    assert race.overlapped


def test_one_key_with_two_requests_at_once_is_one_upload_and_one_conflict(
    client: TestClient, pg_url: str, key: Key, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    race = install_race(monkeypatch)
    other_request_at_once(client, pg_url, key, race, lambda: _queued(broker))
    assert race.overlapped


def test_expired_key_can_be_used_again(
    client: TestClient, pg_url: str, key: Key, broker: redis.Redis
) -> None:
    expired_key_used_again(client, pg_url, key, lambda: _queued(broker))
