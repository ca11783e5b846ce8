"""Migrations create the schema on SQLite and PostgreSQL, and `alembic check` is clean on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Connection, create_engine, inspect, text

from core import migrate
from core.tables import metadata
from tests.conftest import fresh_pg_database

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_sqlite_upgrade_and_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    assert set(metadata.tables) <= _tables(url)
    migrate.check(url)
    migrate.upgrade(url)  # idempotent


def test_postgres_migrated_and_check(pg_url: str) -> None:
    assert set(metadata.tables) <= _tables(pg_url)
    migrate.check(pg_url)


def test_cli_db_upgrade_and_alembic_check_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DRSCREEN_DATABASE_URL": url}
    drscreen = Path(sys.executable).with_name("drscreen")
    alembic = Path(sys.executable).with_name("alembic")
    run = subprocess.run([drscreen, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check = subprocess.run(
        [alembic, "check"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def _old_clinic(conn: Connection) -> None:
    conn.execute(text("INSERT INTO clinic (id, name, created_at) VALUES (1, 'Old', '2026-11-23')"))


def _old_job(conn: Connection, done: int = 0) -> None:
    """Job ``j1`` of clinic 1, finished with ``done`` photographs, as written before the migrations
    under test."""
    conn.execute(
        text(
            "INSERT INTO scoring_job (id, clinic_id, folder, status, total, done, failed,"
            " created_at, updated_at)"
            " VALUES ('j1', 1, '/x', 'done', :done, :done, 0, '2026-11-23', '2026-11-23')"
        ),
        {"done": done},
    )


def test_job_explain_column_added_to_existing_jobs(tmp_path: Path) -> None:
    """A job created before the explain option was stored reads back as explain = false."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "94695bce9b50")  # the initial schema
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _old_clinic(conn)
            _old_job(conn)
        migrate.upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT explain FROM scoring_job WHERE id = 'j1'")).scalar_one() in (
                0,
                False,
            )
    finally:
        engine.dispose()


def test_image_sent_at_starts_as_the_upload_time(tmp_path: Path) -> None:
    """Photographs stored before ``image.sent_at`` existed keep their visit and purge clock: the
    column starts as ``created_at``, which both read until then."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "5e0c2b7d9a41")  # the revision before sent_at
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _old_clinic(conn)
            conn.execute(
                text(
                    "INSERT INTO patient (id, clinic_id, external_id, created_at)"
                    " VALUES (1, 1, 'P', '2026-11-23')"
                )
            )
            for image_id, at in (("a", "2025-01-02 03:04:05"), ("b", "2026-11-23 10:00:00")):
                conn.execute(
                    text(
                        "INSERT INTO image (id, clinic_id, patient_id, eye, sha256, stored_path, size_bytes,"
                        " status, attempts, created_at, updated_at)"
                        " VALUES (:id, 1, 1, 'left', :sha, 'x.jpg', 1, 'done', 1, :at, :at)"
                    ),
                    {"id": image_id, "sha": image_id * 64, "at": at},
                )
            # what hangs off an image: a rebuilt image table (NOT NULL on SQLite) cascaded them away
            conn.execute(
                text("INSERT INTO model_version (id, ref, created_at) VALUES (1, 'e@1', '2026-11-23')")
            )
            conn.execute(
                text(
                    "INSERT INTO prediction (image_id, model_version_id, grade, probabilities, referable,"
                    " gradable, created_at) VALUES ('a', 1, 2, '[0,0,1,0,0]', 1, 1, '2026-11-23')"
                )
            )
            _old_job(conn, done=1)
            conn.execute(
                text(
                    "INSERT INTO scoring_job_item (job_id, path, image_id, status, created_at, updated_at)"
                    " VALUES ('j1', 'a.jpg', 'a', 'done', '2026-11-23', '2026-11-23')"
                )
            )
        migrate.upgrade(url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, created_at, sent_at FROM image ORDER BY id")).all()
            assert conn.execute(text("SELECT count(*) FROM prediction")).scalar_one() == 1
            assert conn.execute(text("SELECT image_id FROM scoring_job_item")).scalar_one() == "a"
        assert [(r[0], r[2]) for r in rows] == [(r[0], r[1]) for r in rows] and len(rows) == 2
        migrate.check(url)
        from alembic import command

        command.downgrade(migrate.alembic_config(url), "5e0c2b7d9a41")  # and back: nothing lost either
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM prediction")).scalar_one() == 1
            assert conn.execute(text("SELECT count(*) FROM image")).scalar_one() == 2
    finally:
        engine.dispose()


def _keys_drawn_and_kept(url: str) -> None:
    from alembic import command

    from core.tables import SAMPLE_KEYS

    command.downgrade(migrate.alembic_config(url), "4c8a1e7f2b90")  # the revision before sample_key
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _old_clinic(conn)
            patient = "INSERT INTO patient (id, clinic_id, external_id, created_at) VALUES (1, 1, 'P', :at)"
            conn.execute(text(patient), {"at": "2026-11-23"})
            for n in range(200):
                conn.execute(
                    text(
                        "INSERT INTO image (id, clinic_id, patient_id, eye, sha256, stored_path, size_bytes,"
                        " status, attempts, created_at, updated_at, sent_at) VALUES (:id, 1, 1, 'left',"
                        " :sha, 'x.jpg', 1, 'done', 1, '2026-11-23', '2026-11-23', '2026-11-23')"
                    ),
                    {"id": f"{n:032x}", "sha": f"{n:064x}"},
                )
            conn.execute(
                text("INSERT INTO model_version (id, ref, created_at) VALUES (1, 'e@1', '2026-11-23')")
            )
            conn.execute(
                text(
                    "INSERT INTO prediction (image_id, model_version_id, grade, probabilities, referable,"
                    " gradable, created_at) VALUES (:id, 1, 2, '[0,0,1,0,0]', true, true, '2026-11-23')"
                ),
                {"id": f"{0:032x}"},
            )
        migrate.upgrade(url)
        with engine.connect() as conn:
            keys = [k for (k,) in conn.execute(text("SELECT sample_key FROM image"))]
        assert all(k is not None and 0 <= k < SAMPLE_KEYS for k in keys) and len(set(keys)) == 200
        assert sum(k < SAMPLE_KEYS // 2 for k in keys) in range(60, 141)  # spread, not constant
        migrate.check(url)
        command.downgrade(migrate.alembic_config(url), "4c8a1e7f2b90")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM prediction")).scalar_one() == 1
            assert conn.execute(text("SELECT count(*) FROM image")).scalar_one() == 200
    finally:
        engine.dispose()


def test_image_sample_key_drawn_for_existing_photographs_on_sqlite(tmp_path: Path) -> None:
    """Photographs stored before the graders' sample had a secret key get one each, spread over
    [0, 2**31) (one value for all would make the sample all or none); downgrading keeps their
    gradings (a rebuilt image table on SQLite cascaded them away)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url)
    _keys_drawn_and_kept(url)


def test_image_sample_key_drawn_for_existing_photographs_on_postgresql() -> None:
    with fresh_pg_database() as url:
        _keys_drawn_and_kept(url)


_AT = "2026-11-24 10:00:00+00:00"

#: Rows of the initial schema, one of each kind that points at another (a folder job's item at its
#: photograph, a photograph at its job, bundle and patient, a prediction and a heatmap at it, ...).
_INITIAL_ROWS = [
    "INSERT INTO clinic (id, name, created_at) VALUES (1, 'North', :t)",
    "INSERT INTO api_key (id, clinic_id, prefix, key_hash, created_at) VALUES (1, 1, 'pfx', 'h1', :t)",
    "INSERT INTO patient (id, clinic_id, external_id, created_at) VALUES (1, 1, 'P16', :t)",
    "INSERT INTO model_version (id, ref, card, created_at) VALUES (1, 'ens@1.0', '{}', :t)",
    "INSERT INTO scoring_job (id, clinic_id, folder, status, total, done, failed, created_at, updated_at)"
    " VALUES ('j1', 1, '/x', 'done', 1, 1, 0, :t, :t)",
    "INSERT INTO bundle (id, clinic_id, patient_id, status, created_at, updated_at)"
    " VALUES ('b1', 1, 1, 'done', :t, :t)",
    "INSERT INTO image (id, clinic_id, patient_id, eye, bundle_id, job_id, sha256, stored_path, size_bytes,"
    " status, attempts, created_at, updated_at, quality, gradable)"
    " VALUES ('i1', 1, 1, 'left', 'b1', 'j1', 's', 'p', 10, 'done', 1, :t, :t, '{}', true)",
    "INSERT INTO prediction (image_id, model_version_id, grade, probabilities, referable, gradable,"
    " created_at) VALUES ('i1', 1, 2, '[0.1, 0.9]', true, true, :t)",
    "INSERT INTO explanation (image_id, model_version_id, sha256, stored_path, created_at)"
    " VALUES ('i1', 1, 's', 'e', :t)",
    "INSERT INTO scoring_job_item (job_id, path, image_id, status, created_at, updated_at)"
    " VALUES ('j1', '/x/a.jpg', 'i1', 'done', :t, :t)",
    "INSERT INTO patient_result (id, patient_id, model_version_id, grade, gradable, referable, is_current,"
    " computed_at) VALUES (1, 1, 1, 2, true, true, true, :t)",
    "INSERT INTO eye_result (patient_result_id, patient_id, eye, grade, gradable, referable, image_ids,"
    " is_current, computed_at) VALUES (1, 1, 'left', 2, true, true, '[\"i1\"]', true, :t)",
]

_COUNTS = {
    "prediction": "SELECT count(*) FROM prediction",
    "explanation": "SELECT count(*) FROM explanation",
    "job items": "SELECT count(*) FROM scoring_job_item",
    "items' photographs": "SELECT count(image_id) FROM scoring_job_item",
    "photographs' jobs": "SELECT count(job_id) FROM image",
    "photographs' bundles": "SELECT count(bundle_id) FROM image",
    "eye results": "SELECT count(*) FROM eye_result",
}


def _every_revision_up_and_down_keeps_the_rows(url: str) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    config = migrate.alembic_config(url)
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))]
    command.upgrade(config, revisions[0])
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in _INITIAL_ROWS:
                conn.execute(text(statement), {"t": _AT})

        def counts() -> dict[str, int]:
            with engine.connect() as conn:
                return {name: int(conn.execute(text(q)).scalar_one()) for name, q in _COUNTS.items()}

        assert set(counts().values()) == {1}
        for revision in revisions[1:]:
            command.upgrade(config, revision)
            assert counts() == dict.fromkeys(_COUNTS, 1), f"upgrade to {revision}"
        for revision in reversed(revisions[:-1]):
            command.downgrade(config, revision)
            assert counts() == dict.fromkeys(_COUNTS, 1), f"downgrade to {revision}"
    finally:
        engine.dispose()


def test_sqlite_migrations_up_and_down_keep_every_row(tmp_path: Path) -> None:
    """The migration review (session 29): on SQLite a table rebuilt by a migration was dropped with
    foreign keys on, and the DROP cascaded: upgrading a database of the initial schema deleted every
    folder job's items, downgrading deleted predictions and heatmaps, and one downgrade failed."""
    _every_revision_up_and_down_keeps_the_rows(f"sqlite:///{tmp_path / 'steps.db'}")


def test_postgresql_migrations_up_and_down_keep_every_row() -> None:
    with fresh_pg_database(migrated=False) as url:
        _every_revision_up_and_down_keeps_the_rows(url)


def test_two_upgrades_at_once_on_postgresql_take_turns() -> None:
    """Two ``drscreen db upgrade`` at once (two containers starting): the second failed with a
    duplicate catalogue entry and a traceback; now it waits for the first and finds nothing to do."""
    drscreen = Path(sys.executable).with_name("drscreen")
    with fresh_pg_database(migrated=False) as url:
        env = {**os.environ, "DRSCREEN_DATABASE_URL": url}
        runs = [
            subprocess.Popen(
                [drscreen, "db", "upgrade"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        outcomes = [(run.wait(timeout=180), run.stderr.read().decode() if run.stderr else "") for run in runs]
        assert [rc for rc, _ in outcomes] == [0, 0], outcomes
        assert migrate.current_revision(url) == migrate.head_revision()


def _upgrade_refuses_tables_made_without_migrations(url: str) -> None:
    drscreen = Path(sys.executable).with_name("drscreen")
    engine = create_engine(url)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    env = {**os.environ, "DRSCREEN_DATABASE_URL": url}
    run = subprocess.run([drscreen, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == f"drscreen db upgrade: {migrate.UNVERSIONED}"
    assert migrate.schema_problem(url) == migrate.UNVERSIONED  # what serve and worker say too


def test_upgrade_of_tables_made_without_migrations_says_what_to_do(tmp_path: Path) -> None:
    """The migration review (session 29): `serve` said "no schema yet: run db upgrade", which then
    failed on "table clinic already exists" (a traceback on PostgreSQL)."""
    _upgrade_refuses_tables_made_without_migrations(f"sqlite:///{tmp_path / 'made.db'}")


def test_upgrade_of_tables_made_without_migrations_on_postgresql() -> None:
    with fresh_pg_database(migrated=False) as url:
        _upgrade_refuses_tables_made_without_migrations(url)


def test_an_upgrade_with_nothing_to_do_is_not_blocked_by_rows_broken_elsewhere(tmp_path: Path) -> None:
    """The second review (session 29): the reference check ran on every Alembic run, so one orphan
    row written with foreign keys off blocked `db upgrade` and `db check` for ever (a traceback)."""
    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    migrate.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("PRAGMA foreign_keys=OFF"))
            conn.execute(
                text(
                    "INSERT INTO api_key (id, clinic_id, prefix, key_hash, created_at)"
                    " VALUES (1, 999, 'p', 'h', '2026-01-01 00:00:00')"
                )
            )
    finally:
        engine.dispose()
    migrate.upgrade(url)  # nothing to do: no check, no error
    migrate.check(url)


def test_tables_made_without_migrations_are_found_by_any_of_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    engine = create_engine(url)
    try:
        metadata.tables["model_version"].create(engine)
    finally:
        engine.dispose()
    assert migrate.upgrade_problem(url) == migrate.UNVERSIONED


def _indexes(url: str) -> dict[str, str]:
    """Every index of the database by name, as the database defines it (its columns, and the
    predicate of a partial one)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                query = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            else:
                query = (
                    "SELECT indexname, indexdef FROM pg_indexes"
                    " WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
                )
            return {str(name): str(definition) for name, definition in conn.exec_driver_sql(query)}
    finally:
        engine.dispose()


#: The revision before the scale review's indexes (29b2a1e6552c).
_BEFORE_SCALE_INDEXES = "b2e5d8a1c3f7"


def _indexes_agree(migrated: str, created: str) -> None:
    from alembic import command

    engine = create_engine(created)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    declared = _indexes(created)
    assert _indexes(migrated) == declared
    assert "WHERE" in declared["ix_patient_result_computed_at_refers_now"]  # checked, predicate too
    config = migrate.alembic_config(migrated)
    command.downgrade(config, _BEFORE_SCALE_INDEXES)
    before = _indexes(migrated)
    replaced = {"ix_scoring_job_item_job_id", "ix_bundle_clinic_id", "ix_patient_result_is_current"}
    assert replaced <= set(before) and not replaced & set(declared)
    command.upgrade(config, "head")
    command.downgrade(config, _BEFORE_SCALE_INDEXES)
    assert _indexes(migrated) == before  # the downgrade puts back what was there
    command.upgrade(config, "head")
    assert _indexes(migrated) == declared


def test_sqlite_migrations_build_the_indexes_the_tables_declare(tmp_path: Path) -> None:
    """`alembic check` compares an index's columns, not a partial index's predicate: the
    migrations' indexes are compared here, definition for definition, with those core.tables
    creates; and the scale review's migration goes down and up again to the same."""
    migrated = f"sqlite:///{tmp_path / 'migrated.db'}"
    migrate.upgrade(migrated)
    _indexes_agree(migrated, f"sqlite:///{tmp_path / 'created.db'}")


def test_postgresql_migrations_build_the_indexes_the_tables_declare() -> None:
    with fresh_pg_database() as migrated, fresh_pg_database(migrated=False) as created:
        _indexes_agree(migrated, created)
