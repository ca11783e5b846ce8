"""On the embedded default (SQLite) a read must not hold the database's write lock while it reads.

SQLite has one write lock for the whole database; a transaction takes it at its first write and
keeps it until the commit. Every audited read (a result, a patient, a bundle, a job, its results
CSV, a web page) wrote its audit row first, and the first request of a key in five minutes (its
last use) and a web page once a minute (the sign-in's last use) wrote before reading too: the
read then held the lock for as long as it read, and every upload, worker write and other read
waited behind it (the SQLite review of session 32: a 3,000-photograph job's results CSV held it
for its whole 1-2 s, and uploads queued behind the downloads). Here every SELECT of such a request
is watched: another connection must be able to take the write lock at that moment.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.engine import make_url

from core import db
from core.db import session_scope
from core.settings import get_settings
from core.store import FileStore
from core.tables import ApiKey, AuditEvent, Image, WebSession, as_utc, utcnow
from tests.api_support import make_key, web_cookie
from tests.unit.test_workers_scoring import BUNDLE, Sent, StubEnsemble, add_images, job_with_photo, photo
from workers import scoring


def write_lock_free(path: str) -> bool:
    """Whether another connection could take the write lock now (without waiting for it)."""
    with closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as other:
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc), exc
            return False
        other.execute("ROLLBACK")
        return True


@contextmanager
def reads_under_the_lock(url: str) -> Iterator[list[str]]:
    """The SELECTs run on ``url``'s engine inside the block while the write lock was held."""
    path = make_url(url).database
    assert path
    held: list[str] = []

    def probe(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and not write_lock_free(path):
            held.append(" ".join(statement.split())[:120])

    engine = db.get_engine(url)
    event.listen(engine, "before_cursor_execute", probe)
    try:
        yield held
    finally:
        event.remove(engine, "before_cursor_execute", probe)


def test_reads_hold_no_write_lock_while_they_read(client: TestClient, url: str) -> None:
    key = make_key(url, "North")
    store = FileStore(get_settings().store_path)
    [single] = add_images(url, store, "P1", [photo("16_left.jpg")])
    in_bundle = add_images(url, store, "P2", [photo(n) for n in BUNDLE], bundle=True)
    job_id, in_job = job_with_photo(url, store, "P3", "17_left.jpg")
    scoring.score_images(
        [single, *in_bundle, in_job], ensemble=StubEnsemble(), store=store, db_url=url, enqueue=Sent()
    )
    cookie = web_cookie(client, key)
    with session_scope(url) as s:
        bundle_id = s.get_one(Image, in_bundle[0]).bundle_id
        # neither the key nor the sign-in used lately: the requests below record their use
        s.execute(update(ApiKey).values(last_used_at=None))
        s.execute(update(WebSession).values(last_seen_at=utcnow() - timedelta(minutes=5)))
    reads = {
        "image": f"/v1/images/{single}",
        "patient": "/v1/patients/P1",
        "bundle": f"/v1/bundles/{bundle_id}",
        "job": f"/v1/jobs/{job_id}",
        "job results CSV": f"/v1/jobs/{job_id}/results?format=csv",
        "job patients": f"/v1/jobs/{job_id}/patients",
    }
    pages = {"web result page": f"/images/{single}", "web photograph": f"/images/{single}/photo"}
    held: dict[str, list[str]] = {}
    for name, path in [*reads.items(), *pages.items()]:
        headers = cookie if name in pages else key.headers
        with reads_under_the_lock(url) as under_lock:
            answer = client.get(path, headers=headers)
        assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
        if under_lock:
            held[name] = under_lock
    assert held == {}, held
    # still recorded, once per read, with the request's work
    with session_scope(url) as s:
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.action.like("%.read"))))
        last_used = s.get_one(ApiKey, key.key_id).last_used_at
        seen = list(s.scalars(select(WebSession.last_seen_at)))
    assert len(actions) == len(reads) + len(pages), actions
    assert last_used is not None
    assert seen and all(utcnow() - as_utc(t) < timedelta(minutes=1) for t in seen), seen
