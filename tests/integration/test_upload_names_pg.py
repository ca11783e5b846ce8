"""Client-supplied text of an upload on real PostgreSQL (the security review): a part's declared
content type over the column's 100 characters, or a NUL in its file name, answered 500 after the
photograph's bytes were already in the store (no row: erasure and purge never found them)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from core.db import session_scope
from core.settings import get_settings
from core.tables import Image
from services.app import create_app
from tests.api_support import make_key
from tests.unit.test_workers_scoring import PHOTOS

#: A Redis database of its own (13: the idempotency tests); emptied after each test.
BROKER_DB = 14


@pytest.fixture
def client(
    pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    broker_url = redis_url.rsplit("/", 1)[0] + f"/{BROKER_DB}"
    monkeypatch.setenv("DRSCREEN_DATABASE_URL", pg_url)
    monkeypatch.setenv("DRSCREEN_BROKER_URL", broker_url)
    monkeypatch.setenv("DRSCREEN_STORE_DIR", str(tmp_path / "store"))
    get_settings.cache_clear()
    with TestClient(create_app()) as c:
        yield c
    with redis.Redis.from_url(broker_url) as broker:
        broker.flushdb()


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [("16_left.jpg", "image/jpeg;" + "a" * 120), ("a\x00b.jpg", "image/jpeg"), ("x.jpg", "image/jp\x00eg")],
    ids=["long-content-type", "nul-in-file-name", "nul-in-content-type"],
)
def test_odd_names_and_types_are_kept_clean_not_a_500(
    client: TestClient, pg_url: str, filename: str, content_type: str
) -> None:
    key = make_key(pg_url, f"Names-{uuid.uuid4().hex[:8]}")
    patient = f"N{uuid.uuid4().hex[:10]}"
    data = (PHOTOS / "16_left.jpg").read_bytes()
    boundary = "drscreen-test-boundary"
    body = b"".join(
        [
            *(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                for name, value in (("patient_id", patient), ("eye", "left"))
            ),
            # raw bytes: httpx refuses to write a control character into a part's header
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode(),
            data,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    answer = client.post(
        "/v1/images",
        headers={**key.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=body,
    )
    assert answer.status_code == 202, answer.text
    with session_scope(pg_url) as s:
        row = s.scalars(select(Image).where(Image.id == answer.json()["id"])).one()
        assert row.filename is None or ("\x00" not in row.filename and len(row.filename) <= 255)
        assert row.content_type is None or ("\x00" not in row.content_type and len(row.content_type) <= 100)
