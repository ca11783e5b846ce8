"""Keep patient identifiers out of the access log.

Patient ids are part of one URL (``/v1/patients/{patient_id}``); uvicorn's access log would print
them. Other ids in URLs are random and carry no patient information, so they stay (they help
operators follow a request)."""

from __future__ import annotations

import logging
import re

_PATIENT_PATH = re.compile(r"(/v1/patients/)[^/?\s]+")
REDACTED = r"\1<redacted>"


def redact_path(path: str) -> str:
    return _PATIENT_PATH.sub(REDACTED, path)


class RedactPatientIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_path(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact_path(record.msg)
        return True


def install_access_log_filter() -> None:
    """Idempotent: several apps in one process (tests) add the filter once."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactPatientIds) for f in access.filters):
        access.addFilter(RedactPatientIds())
