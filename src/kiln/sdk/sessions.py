"""Sessions in the SDK: ``Client`` inherits these methods from ``SessionsAPI``.

    with Client.from_config() as kiln:
        session = kiln.start_session("alice", "demo", profile="small")
        print(session.id, session.state, [e.message for e in session.timeline])
        kiln.stop_session("alice", "demo", session.id)

Starting answers with the session whatever happened: a start the site could not carry out is
a session in state ``failed`` whose ``reason`` says why (``Session.failed``), not an
exception. A session over its owner's quota is ``waiting`` and starts by itself later;
``wait_for_session`` polls until it is running or has ended.
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

# A session in one of these states is over; in the others it may still change.
ENDED_STATES = frozenset({"succeeded", "failed", "timed_out", "stopped"})
# On its way to running: what ``wait_for_session`` waits out.
STARTING_STATES = frozenset({"queued", "waiting", "starting"})
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TimelineEntry(_Model):
    state: str
    at: datetime
    message: str


class Session(_Model):
    id: str
    project: str
    """``owner/slug``"""
    editor: str
    state: str
    reason: str = ""
    outcome: str = ""
    """How it ended, in words ("Stopped by alice."); empty while it lives."""
    stop_cause: str | None = None
    """Why Kiln ended it, when it did: requested, idle, lifetime, start_timeout."""
    exit_code: int | None = None
    """The sandbox's exit status when it ended by itself (not when stopped)."""
    cpu: float
    """vCPU"""
    memory_bytes: int
    profile: str | None = None
    """The resource profile's name; ``None``: the site's default resources."""
    runtime: str | None = None
    """The runtime's name (``None``: removed from the catalog since)."""
    editor_url: str | None = None
    """For an editor served over the web (JupyterLab): a site path that takes a signed-in
    browser to it."""
    created_by: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    timeline: list[TimelineEntry] = []

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "timed_out")


class SessionsAPI(ClientPart):
    """The sessions endpoints; mixed into ``kiln.sdk.Client``, which supplies the transport."""

    def _sessions(self, owner: str, slug: str) -> str:
        return f"{self._project(owner, slug)}/sessions"

    def _session(self, owner: str, slug: str, session_id: str) -> str:
        # Checked here: a '/' or '..' would otherwise reach another address than the
        # session's and come back as a puzzling generic 404.
        if not SESSION_ID.fullmatch(session_id):
            raise KilnSDKError(
                f"{session_id[:80]!r} is not a session id (ids look like 3f2a9c0d1e4b5a69)"
            )
        return f"{self._sessions(owner, slug)}/{session_id}"

    def start_session(
        self,
        owner: str,
        slug: str,
        editor: str = "terminal",
        profile: str | None = None,
        runtime: str | None = None,
        **fields: Any,
    ) -> Session:
        """Start a session (contributors and up). ``editor``: ``terminal`` or ``jupyterlab``
        (when the runtime has it); ``profile``, ``runtime``: names (default: the site's).
        ``fields``: further optional fields of the API; ``None`` values are left out."""
        body = {"editor": editor, "profile": profile, "runtime": runtime, **fields}
        body = {k: v for k, v in body.items() if v is not None}
        response = self._request("POST", self._sessions(owner, slug), json=body)
        return Session.model_validate(response.json())

    def iter_sessions(self, owner: str, slug: str, page_size: int = 100) -> Iterator[Session]:
        """The project's sessions, newest first, fetching pages as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        while True:
            body = self._request("GET", self._sessions(owner, slug), params=params).json()
            yield from (Session.model_validate(s) for s in body["items"])
            if not body.get("next_cursor"):
                return
            params["cursor"] = body["next_cursor"]

    def list_sessions(self, owner: str, slug: str) -> list[Session]:
        return list(self.iter_sessions(owner, slug))

    def get_session(self, owner: str, slug: str, session_id: str) -> Session:
        """One session with its timeline (a live one is checked with the runner first)."""
        response = self._request("GET", self._session(owner, slug, session_id))
        return Session.model_validate(response.json())

    def stop_session(self, owner: str, slug: str, session_id: str) -> Session:
        """Stop a session and return it as it ended. A session that already ended is an
        error (409); a runner that cannot be reached is a 503 (stopping again finishes it)."""
        response = self._request("DELETE", self._session(owner, slug, session_id))
        return Session.model_validate(response.json())

    def wait_for_session(
        self,
        owner: str,
        slug: str,
        session_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> Session:
        """Poll until the session is no longer queued, waiting or starting (it is running,
        or it has ended); ``KilnSDKError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            session = self.get_session(owner, slug, session_id)
            if session.state not in STARTING_STATES:
                return session
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(
                    f"session {session_id} is still {session.state} after {timeout:g} s"
                )
            time.sleep(interval)
