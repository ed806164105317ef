"""Domain errors. The API turns each into an ``application/problem+json`` response."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error a user can cause. ``status`` is the HTTP status it maps to."""

    status = 400
    title = "Bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


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
