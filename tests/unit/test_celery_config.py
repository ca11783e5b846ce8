from __future__ import annotations

import json
from pathlib import Path

from core import producer, tasks
from core.celery_config import (
    EXPAND_FOLDER_TIME_LIMITS,
    TASK_TIME_LIMIT_S,
    broker_folders,
    build_celery_config,
    prune_processed,
)
from core.settings import Settings, get_settings


def test_embedded_config_uses_filesystem_folders(isolated_settings: Path) -> None:
    s = get_settings()
    conf = build_celery_config(s)
    folders = broker_folders(s)
    assert conf["broker_url"] == "filesystem://"
    opts = conf["broker_transport_options"]
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(folders["queue"])
    assert all(p.is_dir() for p in folders.values())
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_routes"][tasks.EXPLAIN_IMAGE] == {"queue": "explain"}


def test_redis_config() -> None:
    conf = build_celery_config(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert conf["broker_transport_options"] == {"visibility_timeout": 3600}


def test_task_names_and_queues() -> None:
    assert tasks.queue_for(tasks.SCORE_IMAGES) == "scoring"
    assert tasks.queue_for(tasks.EXPLAIN_IMAGE) == "explain"
    assert tasks.queue_for(tasks.EXPAND_FOLDER) == "scoring"
    assert tasks.queue_for(tasks.SWEEP) == "scoring"
    assert all(name.count(".") == 1 for name in tasks.TASK_QUEUES)


def test_producer_writes_a_message_file_on_the_embedded_broker(isolated_settings: Path) -> None:
    task_id = producer.send_explain_image("abc123")
    files = list(broker_folders(get_settings())["queue"].glob("*.explain.msg"))
    assert len(files) == 1
    body = json.loads(files[0].read_text())
    assert body["headers"]["task"] == "explain.explain_image" and body["headers"]["id"] == task_id
    producer.send_score_images(["a", "b"])
    assert len(list(broker_folders(get_settings())["queue"].glob("*.uploads.msg"))) == 1


def test_prune_processed(isolated_settings: Path) -> None:
    s = get_settings()
    folder = broker_folders(s)["processed"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "old.msg").write_text("x")
    assert prune_processed(s, max_age_seconds=-1) == 1


def test_worker_waits_for_a_pool_child_loading_the_ensemble(isolated_settings: Path) -> None:
    # Celery kills a new pool child that has not reported "up" after worker_proc_alive_timeout
    # (4 s by default); ours load torch and the ensemble first, so a replacement child would be
    # killed over and over on a busy machine.
    from workers.app import celery_app

    assert celery_app.conf.worker_proc_alive_timeout >= 60


def test_tasks_have_time_limits(isolated_settings: Path) -> None:
    """A task stuck in a system call must not hold a pool child for ever; none that can
    legitimately run may be stopped (docs in core.celery_config)."""
    soft, hard = EXPAND_FOLDER_TIME_LIMITS
    for settings in (get_settings(), Settings(broker_url="redis://127.0.0.1:6379/0")):
        conf = build_celery_config(settings)
        assert conf["task_time_limit"] == TASK_TIME_LIMIT_S
        assert conf["task_soft_time_limit"] is None  # scoring's per-batch except would swallow it
        assert conf["task_annotations"] == {
            tasks.EXPAND_FOLDER: {"soft_time_limit": soft, "time_limit": hard}
        }
    # Generous: a 256-photo chunk with heatmaps is minutes; expansion of a big folder is hours.
    assert 30 * 60 <= TASK_TIME_LIMIT_S < 3600  # and under Redis' visibility timeout
    # every limit under Redis' visibility timeout: a task still running past it is redelivered
    visibility = build_celery_config(Settings(broker_url="redis://127.0.0.1:6379/0"))[
        "broker_transport_options"
    ]
    assert 30 * 60 <= soft < hard < visibility["visibility_timeout"]

    # The worker's tasks carry them (annotations), the producer's messages do not override them.
    import workers.tasks  # noqa: F401  (registers the tasks)
    from workers.app import celery_app

    limits = {
        name: (celery_app.tasks[name].soft_time_limit, celery_app.tasks[name].time_limit)
        for name in tasks.TASK_QUEUES
    }
    assert limits == {
        tasks.SCORE_IMAGES: (None, TASK_TIME_LIMIT_S),
        tasks.EXPLAIN_IMAGE: (None, TASK_TIME_LIMIT_S),
        tasks.EXPAND_FOLDER: (soft, hard),
        tasks.SWEEP: (None, TASK_TIME_LIMIT_S),
    }
    producer.send_expand_folder("job-1")
    [message] = broker_folders(get_settings())["queue"].glob("*.scoring.msg")
    assert json.loads(message.read_text())["headers"]["timelimit"] == [None, None]
