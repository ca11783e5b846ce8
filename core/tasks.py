"""Task names and queue names: the only thing the producer and the workers share.

Tasks carry ids, never objects. Arguments (positional):

- ``scoring.score_images(image_ids: list[str])``     queue ``scoring`` (a clinic's upload: ``uploads``)
- ``explain.explain_image(image_id: str)``          queue ``explain``
- ``jobs.expand_folder(job_id: str)``               queue ``scoring``
- ``maintenance.sweep()``                           queue ``scoring``
"""

from __future__ import annotations

from typing import Final

QUEUE_SCORING: Final = "scoring"
QUEUE_EXPLAIN: Final = "explain"
#: Photographs and bundles a clinic uploads. A queue of their own, which workers take from in turn
#: with ``scoring``: in the one queue an upload waited behind every chunk of a folder job sent
#: before it (a 3,000-photograph job: 60 s with the dev ensemble; the SQLite review of session 32).
QUEUE_UPLOADS: Final = "uploads"
ALL_QUEUES: Final = (QUEUE_SCORING, QUEUE_EXPLAIN, QUEUE_UPLOADS)
#: What ``drscreen worker`` consumes unless told otherwise.
WORKER_QUEUES: Final = ",".join((QUEUE_UPLOADS, QUEUE_SCORING, QUEUE_EXPLAIN))

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
