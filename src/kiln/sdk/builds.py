"""Builds in the SDK: ``Client`` inherits these methods from ``BuildsAPI``.

    with Client.from_config() as kiln:
        build = kiln.create_build("alice", "demo")          # the project's files as they are
        for chunk in kiln.iter_build_logs("alice", "demo", build.number, follow=True):
            print(chunk.decode(), end="")
        build = kiln.get_build("alice", "demo", build.number)
        print(build.state, build.image.reference if build.image else "")

A build is numbered within its project. ``wait_for_build`` polls until it has ended.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from kiln.sdk.errors import KilnSDKError
from kiln.sdk.models import _Model
from kiln.sdk.part import ClientPart
from kiln.sdk.streaming import stream_bytes

ENDED_STATES = frozenset({"succeeded", "failed", "timed_out", "stopped"})


class BuildStep(_Model):
    name: str
    status: str
    detail: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None


class BuiltImage(_Model):
    registry: str
    repository: str
    tags: list[str] = []
    digest: str
    reference: str


class Build(_Model):
    number: int
    id: str
    project: str
    state: str
    reason: str = ""
    attempt: int = 1
    started_by: str | None = None
    source_commit: str | None = None
    commit: str | None = None
    base: str
    base_digest: str | None = None
    no_cache: bool = False
    command: list[str] = []
    dependencies_cached: bool | None = None
    layers: dict[str, Any] = {}
    steps: list[BuildStep] = []
    image: BuiltImage | None = None
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


class BuildsAPI(ClientPart):
    """The builds endpoints; mixed into ``kiln.sdk.Client``, which supplies the transport."""

    def _builds(self, owner: str, slug: str) -> str:
        return f"{self._project(owner, slug)}/builds"

    def create_build(
        self,
        owner: str,
        slug: str,
        *,
        commit: str | None = None,
        base: str | None = None,
        no_cache: bool = False,
        command: list[str] | None = None,
    ) -> Build:
        """Queue a build (contributors and up). ``commit`` builds a commit, branch or tag
        instead of the files as they are now; ``no_cache`` installs dependencies again."""
        body: dict[str, Any] = {"no_cache": no_cache}
        body |= {k: v for k, v in (("commit", commit), ("base", base), ("command", command)) if v}
        response = self._request("POST", self._builds(owner, slug), json=body)
        return Build.model_validate(response.json())

    def iter_builds(self, owner: str, slug: str, page_size: int = 50) -> Iterator[Build]:
        """The project's builds, newest first, fetching pages as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        while True:
            body = self._request("GET", self._builds(owner, slug), params=params).json()
            yield from (Build.model_validate(b) for b in body["items"])
            if not body.get("next_cursor"):
                return
            params["cursor"] = body["next_cursor"]

    def get_build(self, owner: str, slug: str, number: int) -> Build:
        response = self._request("GET", f"{self._builds(owner, slug)}/{int(number)}")
        return Build.model_validate(response.json())

    def cancel_build(self, owner: str, slug: str, number: int) -> Build:
        url = f"{self._builds(owner, slug)}/{int(number)}/cancel"
        return Build.model_validate(self._request("POST", url).json())

    def wait_for_build(
        self,
        owner: str,
        slug: str,
        number: int,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> Build:
        """Poll until the build has ended; ``KilnSDKError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            build = self.get_build(owner, slug, number)
            if build.ended:
                return build
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(f"build {number} is still {build.state} after {timeout:g} s")
            time.sleep(interval)

    def iter_build_logs(
        self, owner: str, slug: str, number: int, offset: int = 0, follow: bool = False
    ) -> Iterator[bytes]:
        """The build's log (one across its attempts) from byte ``offset``; with ``follow``
        the stream stays open until the build has ended."""
        url = f"{self._builds(owner, slug)}/{int(number)}/logs"
        params = {"offset": offset, "follow": "true" if follow else "false"}
        yield from stream_bytes(self._http, url, params, follow)
