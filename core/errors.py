"""Domain errors. They carry no HTTP codes: the API maps them in one handler."""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every error drscreen raises on purpose."""

    code = "error"

    def __init__(self, message: str = "", detail: object = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail = detail


class NotFound(DomainError):
    """An id that does not exist, or belongs to another clinic (both look the same from outside)."""

    code = "not_found"


class InvalidInput(DomainError):
    """Missing fields, wrong values, or a request that cannot be honoured as given."""

    code = "invalid_input"


class InvalidImage(InvalidInput):
    """Bytes that are not an image, a truncated or corrupt image."""

    code = "invalid_image"


class TooLarge(InvalidInput):
    """An upload or a photograph over the configured limits."""

    code = "too_large"


class Forbidden(DomainError):
    """A folder outside the import roots, or another action the caller may not take."""

    code = "forbidden"


class Unauthorized(DomainError):
    """Missing, unknown or revoked API key."""

    code = "unauthorized"


class Conflict(DomainError):
    """The request clashes with the current state (e.g. a duplicate name)."""

    code = "conflict"


class Unavailable(DomainError):
    """A dependency (database, broker, model) cannot be reached right now."""

    code = "unavailable"
