"""Task names and queue names: the only thing the producer and the workers share.

Tasks carry ids, never objects. Arguments (positional):

- ``scoring.score_images(image_ids: list[str])``     queue ``scoring``
- ``explain.explain_image(image_id: str)``          queue ``explain``
- ``jobs.expand_folder(job_id: str)``               queue ``scoring``
- ``maintenance.sweep()``                           queue ``scoring``
"""

from __future__ import annotations

from typing import Final

QUEUE_SCORING: Final = "scoring"
QUEUE_EXPLAIN: Final = "explain"
ALL_QUEUES: Final = (QUEUE_SCORING, QUEUE_EXPLAIN)

SCORE_IMAGES: Final = "scoring.score_images"
EXPLAIN_IMAGE: Final = "explain.explain_image"
EXPAND_FOLDER: Final = "jobs.expand_folder"
SWEEP: Final = "maintenance.sweep"

#: task name -> queue it is routed to
TASK_QUEUES: Final[dict[str, str]] = {
    SCORE_IMAGES: QUEUE_SCORING,
    EXPLAIN_IMAGE: QUEUE_EXPLAIN,
    EXPAND_FOLDER: QUEUE_SCORING,
    SWEEP: QUEUE_SCORING,
}


def queue_for(task_name: str) -> str:
    """The queue a task name is routed to (``scoring`` for names not listed)."""
    return TASK_QUEUES.get(task_name, QUEUE_SCORING)
