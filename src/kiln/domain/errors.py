"""Domain errors. The API turns each into an ``application/problem+json`` response."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KilnError(Exception):
    """Base of every error a user can cause. ``status`` is the HTTP status it maps to;
    ``field``, when known, names the input it is about (the problem's ``errors`` carry it, and
    the UI shows the message at that form field)."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


@contextmanager
def about_field(name: str) -> Iterator[None]:
    """Errors raised inside are about the input ``name`` (unless they already name one)."""
    try:
        yield
    except KilnError as exc:
        if exc.field is None:
            exc.field = name
        raise


class InvalidInput(KilnError):
    status = 422
    title = "Invalid input"


class BadPath(KilnError):
    status = 400
    title = "Invalid path"


class NotAuthenticated(KilnError):
    status = 401
    title = "Authentication required"


class Forbidden(KilnError):
    status = 403
    title = "Forbidden"


class NotFound(KilnError):
    status = 404
    title = "Not found"


class Conflict(KilnError):
    status = 409
    title = "Conflict"


class TooLarge(KilnError):
    status = 413
    title = "Content too large"


class QuotaExceeded(KilnError):
    status = 507
    title = "Quota exceeded"


class TooManyRequests(KilnError):
    status = 429
    title = "Too many requests"

    def __init__(self, detail: str, retry_after: float = 0.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
