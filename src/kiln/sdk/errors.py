"""What the SDK raises. Every failure is a ``KilnSDKError``, so callers can catch one type."""

from __future__ import annotations


class KilnSDKError(Exception):
    """Base of everything the SDK raises on purpose."""


class KilnAPIError(KilnSDKError):
    """The server answered with an error (an ``application/problem+json`` body, usually).

    ``detail`` is the server's own explanation, for example
    ``"project alice/demo not found"``; ``title`` is the short name of the status.
    """

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class KilnConnectionError(KilnSDKError):
    """The server could not be reached (refused, DNS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class KilnTLSError(KilnConnectionError):
    """The server's certificate was not trusted.

    A site started with ``kiln up`` uses a certificate from its own CA: pass
    ``verify="DATA_DIR/pki/ca.crt"`` (or ``kiln login --ca-file``).
    """


class NotLoggedIn(KilnSDKError):
    """No saved login: ``Client.from_config()`` found no configuration file."""
