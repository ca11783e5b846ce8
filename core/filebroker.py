"""The embedded broker's transport: kombu's filesystem transport with an atomic publish.

kombu's ``filesystem`` transport publishes by opening ``<queue folder>/<time>_<uuid>.<queue>.msg``
and then writing the message into it, so a consumer that lists the folder in between claims an
empty file: the message fails to decode and is lost (the photograph stays ``queued`` until the
maintenance sweep re-queues it, minutes later). Two processes hammering one queue lost 245 of
20,000 messages that way (docs/reliability.md). Here the message is written to a hidden temporary
name first and renamed into place, so a consumer sees either no file or the whole message.

Celery loads it through ``broker_transport`` (:func:`core.celery_config.build_celery_config`); the
broker URL stays ``filesystem://``.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: ``broker_transport`` value that selects this module's transport.
TRANSPORT_PATH = "core.filebroker:Transport"


def message_filename(queue: str, now_ms: int) -> str:
    """The name kombu's consumer looks for: ``<ms>_<uuid>.<queue>.msg`` (sorted oldest first)."""
    return f"{now_ms}_{uuid.uuid4()}.{queue}.msg"


class Channel(filesystem.Channel):
    # kombu's base class declares _put(queue, message); its filesystem channel, like this one, also
    # takes the keyword arguments of _put_fanout
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Put ``payload`` on ``queue``; it becomes visible only once completely written."""
        folder = self.data_folder_out
        final = os.path.join(folder, message_filename(queue, round(monotonic() * 1000)))
        # A leading dot keeps the partial file out of every queue: consumers match the text after
        # the first dot against "<queue>.msg".
        partial = os.path.join(folder, f".{uuid.uuid4()}.partial")
        try:
            with open(partial, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc
        finally:
            if os.path.exists(partial):
                os.unlink(partial)


class Transport(filesystem.Transport):
    Channel = Channel
