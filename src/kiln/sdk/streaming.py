"""Reading a text stream the server keeps open (a job run's or a build's log, followed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx


def stream_bytes(
    http: httpx.Client, url: str, params: dict[str, Any], follow: bool
) -> Iterator[bytes]:
    """The response body as it arrives. With ``follow`` there is no read timeout: a quiet
    workload may print nothing for a long time. Errors are the SDK's own."""
    # Imported here: kiln.sdk.client imports the API mixins that use this module.
    from kiln.sdk.client import _connection_error, raise_for_problem

    timeout = httpx.Timeout(None, connect=10.0) if follow else http.timeout
    try:
        with http.stream("GET", url, params=params, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                raise_for_problem(response)
            yield from response.iter_bytes()
    except httpx.HTTPError as exc:
        site = str(http.base_url).removesuffix("api/v1/")
        raise _connection_error(site, exc) from exc
