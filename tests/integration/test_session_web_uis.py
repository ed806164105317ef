"""Web UIs inside a session: TensorBoard on ``$CDSW_APP_PORT`` and a read-only page on
``$CDSW_READONLY_PORT``, started from the session's terminal as a user would, reached at
``app-<id>`` (those who may use the session) and ``read-only-<id>`` (its viewers too)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from kiln.testing.live import LiveServer
from tests.conftest import Account
from tests.integration.apps_support import Site, app_file, make_project, site_for, wait_for
from tests.integration.test_sessions_support import runner  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("runner"),
    pytest.mark.one_database,
]

START_UIS = (
    "echo ports $CDSW_APP_PORT $CDSW_READONLY_PORT; python tensorboard_logs.py tb-logs && "
    "setsid nohup tensorboard --logdir tb-logs --host 127.0.0.1 --port $CDSW_APP_PORT "
    "> /tmp/tb.log 2>&1 < /dev/null & "
    "mkdir -p /tmp/report && echo 'accuracy 0.93' > /tmp/report/index.html && "
    "setsid nohup python -m http.server --bind 127.0.0.1 --directory /tmp/report "
    "$CDSW_READONLY_PORT > /tmp/ro.log 2>&1 < /dev/null & echo started-uis\n"
)


def read_line(ws: ClientConnection, line: bytes) -> bytes:
    """Terminal output until a whole line equals ``line`` (not the echo of the command)."""
    pattern = re.compile(rb"[\r\n]" + re.escape(line) + rb"\r\n")
    seen = b""
    while not pattern.search(seen):
        frame = ws.recv(timeout=60)
        seen += frame if isinstance(frame, bytes) else frame.encode()
    return seen


@contextmanager
def web_uis(site: Site, who: Account, project: str) -> Iterator[dict[str, Any]]:
    """A terminal session running TensorBoard and a read-only report server, for as long as
    its terminal stays open (closing a terminal ends what it started, as in a browser)."""
    with site.api(who) as http:
        session: dict[str, Any] = http.post(
            f"{project}/sessions", json={"editor": "terminal"}
        ).json()
        assert session["state"] == "running", session
    url = f"wss://localhost:{site.port}{project}/sessions/{session['id']}/terminal"
    sock = socket.create_connection(("127.0.0.1", site.port))
    with connect(url, sock=sock, ssl=site.tls, additional_headers=who.headers) as ws:
        ws.send(START_UIS.encode())
        seen = read_line(ws, b"started-uis")
        assert b"ports 8100 8101\r\n" in seen, seen  # the variables, expanded by the shell
        yield session


def test_tensorboard_and_a_read_only_page_inside_a_session(
    live: LiveServer, alice: Account, bob: Account, make_user: Any
) -> None:
    site = site_for(live)
    with site.api(alice) as http:
        project = make_project(
            http, "training", {"tensorboard_logs.py": app_file("tensorboard_logs.py")}
        )
        assert http.put(f"{project}/collaborators/bob", json={"role": "viewer"}).is_success
    with web_uis(site, alice, project) as session:
        check_web_uis(site, alice, bob, make_user, project, session["id"])


def check_web_uis(
    site: Site, alice: Account, bob: Account, make_user: Any, project: str, sid: str
) -> None:
    app, read_only = f"app-{sid}", f"read-only-{sid}"

    cookies = site.sign_in(alice, f"/open/{app}")

    def scalars_active() -> bool:
        answer = site.on(app, "GET", "/data/plugins_listing", cookies)
        return answer.status_code == 200 and answer.json()["scalars"]["enabled"]

    wait_for(scalars_active, 60, "TensorBoard to load the logs")
    tags = site.on(app, "GET", "/data/plugin/scalars/tags", cookies).json()
    assert "loss" in tags["."], tags
    report = site.sign_in(alice, f"/open/{read_only}")
    assert "accuracy 0.93" in site.on(read_only, "GET", "/", report).text

    # A viewer reads the read-only port, not the one that can act in the session.
    bob_report = site.sign_in(bob, f"/open/{read_only}")
    assert "accuracy 0.93" in site.on(read_only, "GET", "/", bob_report).text
    with site.api(bob) as http:
        refused = http.get(f"/open/{app}")
        assert refused.status_code == 403, refused.text
    # A stranger: nothing here, either way.
    carol = make_user("carol")
    with site.api(carol) as http:
        assert http.get(f"/open/{read_only}").status_code == 404
    # A cookie of one origin is worth nothing on the other.
    assert site.on(app, "GET", "/", report).status_code == 303
    # Once the session stops, its web UIs are gone.
    with site.api(alice) as http:
        assert http.delete(f"{project}/sessions/{sid}").json()["state"] == "stopped"
    wait_for(lambda: site.on(app, "GET", "/", cookies).status_code == 409, 10, "a 409 page")


def test_the_ports_exist_in_every_session(live: LiveServer, alice: Account) -> None:
    """Even a terminal session gets both ports; what listens there is the user's business."""
    site = site_for(live)
    with site.api(alice) as http:
        project = make_project(http, "plain", {})
        session = http.post(f"{project}/sessions", json={"editor": "terminal"}).json()
        cookies = site.sign_in(alice, f"/open/app-{session['id']}")
        nothing = site.on(f"app-{session['id']}", "GET", "/", cookies)
        assert nothing.status_code == 502 and "nothing answered" in nothing.text
        http.delete(f"{project}/sessions/{session['id']}")
