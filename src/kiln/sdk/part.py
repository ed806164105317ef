"""What every endpoint group of the SDK needs from ``kiln.sdk.Client``.

The groups (jobs, sessions, builds, applications, models) are mixins: each is a class of its own, so
it reads on its own, and ``Client`` inherits them all and supplies the transport.
"""

from __future__ import annotations

from typing import Any

import httpx


class ClientPart:
    """The transport a group of endpoints uses; ``Client`` provides the real methods."""

    _http: httpx.Client

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        raise NotImplementedError  # pragma: no cover - provided by Client

    def _project(self, owner: str, slug: str) -> str:
        raise NotImplementedError  # pragma: no cover - provided by Client
