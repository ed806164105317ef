"""Applications in the SDK: ``Client`` inherits these methods from ``ApplicationsAPI``.

    with Client.from_config() as kiln:
        app = kiln.create_application(
            "alice", "demo", name="sales", subdomain="sales", script="app.sh"
        )
        app = kiln.wait_for_application("alice", "demo", "sales")
        print(app.state, app.url)

An application keeps running until it is stopped; ``state`` says what it does now
(``running``, ``starting``, ``waiting`` for quota, ``crashed``, ``crash-looping``,
``stopping``, ``stopped``) and ``message`` why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from kiln.sdk.errors import KilnSDKError
from kiln.sdk.models import _Model
from kiln.sdk.part import ClientPart
from kiln.sdk.sessions import TimelineEntry

# States an application passes through on its way up.
STARTING_STATES = frozenset({"starting", "waiting"})
APP_REF = re.compile(r"[^/\x00-\x1f]{1,100}")


class Instance(_Model):
    id: str
    state: str
    reason: str = ""
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    timeline: list[TimelineEntry] = []


class Application(_Model):
    id: int
    project: str
    """``owner/slug``"""
    name: str
    subdomain: str
    url: str
    """Where it is served: ``https://{subdomain}.{content domain}/``."""
    description: str = ""
    script: str
    runtime: str | None = None
    profile: str | None = None
    cpu: float
    memory_bytes: int
    env: dict[str, str] = {}
    public: bool = False
    reachable_publicly: bool = False
    """Public now: marked public, and the site allows public applications."""
    desired: str
    """``running`` or ``stopped``: what its users asked for."""
    state: str
    message: str = ""
    restarting: bool = False
    crashes: int = 0
    restart_at: datetime | None = None
    last_output: str = ""
    instance: Instance | None = None
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime


class ApplicationsAPI(ClientPart):
    """The applications endpoints; mixed into ``kiln.sdk.Client``."""

    def _stream_log(self, url: str, offset: int, follow: bool) -> Iterator[bytes]:
        raise NotImplementedError  # pragma: no cover - provided by JobsAPI

    def _apps(self, owner: str, slug: str) -> str:
        return f"{self._project(owner, slug)}/applications"

    def _app(self, owner: str, slug: str, name: str) -> str:
        if not APP_REF.fullmatch(name) or name in (".", ".."):
            raise KilnSDKError(f"{name[:80]!r} is not an application's name")
        return f"{self._apps(owner, slug)}/{name}"

    def list_applications(self, owner: str, slug: str) -> list[Application]:
        response = self._request("GET", self._apps(owner, slug))
        return [Application.model_validate(a) for a in response.json()]

    def my_applications(self) -> list[Application]:
        """Every application the caller may open, site-wide."""
        return [Application.model_validate(a) for a in self._request("GET", "applications").json()]

    def get_application(self, owner: str, slug: str, name: str) -> Application:
        response = self._request("GET", self._app(owner, slug, name))
        return Application.model_validate(response.json())

    def create_application(
        self, owner: str, slug: str, name: str, subdomain: str, script: str, **fields: Any
    ) -> Application:
        """Create an application (contributors and up); it starts at once. ``fields``:
        ``description``, ``runtime``, ``profile``, ``env``, ``public``."""
        body = {"name": name, "subdomain": subdomain, "script": script, **fields}
        response = self._request("POST", self._apps(owner, slug), json=body)
        return Application.model_validate(response.json())

    def update_application(self, owner: str, slug: str, name: str, **fields: Any) -> Application:
        """Change fields; a new script, runtime, profile or environment restarts it."""
        response = self._request("PATCH", self._app(owner, slug, name), json=fields)
        return Application.model_validate(response.json())

    def delete_application(self, owner: str, slug: str, name: str) -> None:
        self._request("DELETE", self._app(owner, slug, name))

    def _act(self, owner: str, slug: str, name: str, action: str) -> Application:
        response = self._request("POST", f"{self._app(owner, slug, name)}/{action}")
        return Application.model_validate(response.json())

    def start_application(self, owner: str, slug: str, name: str) -> Application:
        return self._act(owner, slug, name, "start")

    def stop_application(self, owner: str, slug: str, name: str) -> Application:
        return self._act(owner, slug, name, "stop")

    def restart_application(self, owner: str, slug: str, name: str) -> Application:
        """A new instance starts; the running one serves until the new one answers."""
        return self._act(owner, slug, name, "restart")

    def iter_application_logs(
        self, owner: str, slug: str, name: str, offset: int = 0, follow: bool = False
    ) -> Iterator[bytes]:
        """The console of its serving (or last) instance, from byte ``offset``; with
        ``follow``, as it prints until that instance ends."""
        return self._stream_log(f"{self._app(owner, slug, name)}/logs", offset, follow)

    def wait_for_application(
        self,
        owner: str,
        slug: str,
        name: str,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> Application:
        """Poll while it is starting or waiting (and not restarting); ``KilnSDKError``
        after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            app = self.get_application(owner, slug, name)
            if app.state not in STARTING_STATES and not app.restarting:
                return app
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(f"application {name} is still {app.state} after {timeout:g} s")
            time.sleep(interval)
