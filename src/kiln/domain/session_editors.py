"""A session's runtime and editor: which root filesystem it runs on, what its main process is,
and when its editor is ready.

A session runs on a runtime of the catalog (``kiln.domain.resources``) and offers that
runtime's editors: the terminal always (shells are Exec'd into the sandbox, whose main
process only keeps it alive), JupyterLab when the runtime ships ``jupyter-lab``. A JupyterLab
session's main process *is* JupyterLab, listening on ``JUPYTERLAB_PORT`` inside the sandbox;
the runner forwards a host port to it (the workload's ``endpoint``), and the web tier proxies
it on the session's own origin ``<session id>.<content domain>`` (``kiln.apps.proxy``),
where the proxy, not JupyterLab, authenticates: JupyterLab runs without a token.

A session with an editor port stays ``starting`` after its sandbox starts, until the editor
answers HTTP on that port (``poll_editor``, called by each look at the session); past
``EDITOR_START_SECONDS`` it is stopped and fails, saying so.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.workload_models import Runtime
from kiln.domain.errors import InvalidInput
from kiln.domain.resources import default_runtime, ensure_builtin_runtime
from kiln.rpc import runner_pb2 as pb
from kiln.runtimes.base import SANDBOX_HOME
from kiln.runtimes.catalog import BUILTIN_NAME, EDITOR_JUPYTERLAB, EDITOR_TERMINAL

KNOWN_EDITORS = (EDITOR_TERMINAL, EDITOR_JUPYTERLAB)
JUPYTERLAB_PORT = 8888
# CML's ports for web UIs a user runs inside a session (TensorBoard, a Dash prototype):
# CDSW_APP_PORT for those who may use the session, CDSW_READONLY_PORT for its viewers.
CDSW_APP_PORT = 8100
CDSW_READONLY_PORT = 8101
WEB_UI_PORTS = (CDSW_APP_PORT, CDSW_READONLY_PORT)
# JupyterLab takes 2-4 s to answer on an idle machine; a loaded one, or an image with many
# server extensions, can take much longer. Past this the start is called failed.
EDITOR_START_SECONDS = 90.0
PROBE_TIMEOUT = 1.0


# ---- choosing ------------------------------------------------------------------------------


def choose_runtime(db: Session, name: str | None, editor: str) -> Runtime:
    """The runtime a new session runs on (``name``, else the site's default), checked to offer
    ``editor``. Unknown runtimes and editors the runtime lacks are 422s that say what exists."""
    found = default_runtime(db) if name is None else _named_runtime(db, name)
    if found is None:
        names = ", ".join(db.scalars(select(Runtime.name).order_by(Runtime.id)))
        raise InvalidInput(f"no runtime named {str(name)[:100]!r}; runtimes: {names}")
    row = ensure_builtin_runtime(db) if found.name == BUILTIN_NAME else found
    if editor not in KNOWN_EDITORS:
        raise InvalidInput(f"unknown editor {editor[:40]!r}; editors: {', '.join(KNOWN_EDITORS)}")
    if editor not in row.editors:
        raise InvalidInput(
            f"runtime {row.name!r} has no {editor}; its editors: {', '.join(row.editors)}"
        )
    return row


def _named_runtime(db: Session, name: str) -> Runtime | None:
    row = db.scalar(select(Runtime).where(Runtime.name == name))
    if row is None and name == BUILTIN_NAME:
        return ensure_builtin_runtime(db)  # always in the catalog, even before anyone looked
    return row


def runtime_ref(runtime: Runtime | None) -> pb.RuntimeRef:
    """What the runner needs to know of a runtime. An image's root is sent resolved: the
    runner accepts only paths inside its own runtime cache (``RunnerServicer.runtime_root``)."""
    if runtime is None or runtime.rootfs_path is None:
        return pb.RuntimeRef(id=runtime.name if runtime else BUILTIN_NAME)
    return pb.RuntimeRef(
        id=runtime.name,
        image=runtime.digest or "",
        rootfs=str(Path(runtime.rootfs_path).resolve()),
    )


def image_env(runtime: Runtime | None) -> dict[str, str]:
    """The image config's ``Env`` (PATH, PYTHON_VERSION, ...): the bottom layer of a session's
    environment, under the site's, the project's and Kiln's own variables."""
    return {str(pair[0]): str(pair[1]) for pair in (runtime.env if runtime else []) if pair}


# ---- the editor's process ------------------------------------------------------------------


@dataclass(frozen=True)
class EditorProcess:
    """The sandbox's main process for an editor. No command: the runner's keep-alive."""

    command: tuple[str, ...] = ()
    port: int = 0  # the declared port the editor answers on (0: none, ready at once)
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = ""  # GET this on the port: any answer below 500 means it is up


# JupyterLab's own settings live in the sandbox's /tmp (kiln.runtimes.base.TOOL_STATE_ENV):
# seeded before it starts with what Kiln's sessions need, then JupyterLab runs in its place.
JUPYTERLAB_SETTINGS_DIR = "/tmp/.jupyter/lab/user-settings"  # noqa: S108 (the sandbox's tmpfs)
_SEED_SETTINGS = """\
set -e
d="$JUPYTERLAB_SETTINGS_DIR/@jupyterlab/apputils-extension"
mkdir -p "$d"
# No first-screen question about fetching Jupyter news from the internet, and no fetching.
[ -e "$d/notification.jupyterlab-settings" ] ||
  echo '{"fetchNews": "false"}' > "$d/notification.jupyterlab-settings"
# No "Build recommended" prompt for extensions packaged the old way (Dash installs one): the
# runtime's files are read-only, so a rebuild could never be done from inside a session.
c="${JUPYTER_CONFIG_DIR:-/tmp/.jupyter}/labconfig"
mkdir -p "$c"
[ -e "$c/page_config.json" ] ||
  echo '{"buildCheck": false, "buildAvailable": false}' > "$c/page_config.json"
exec "$@"
"""


def _jupyterlab() -> EditorProcess:
    command = (
        "/bin/sh",
        "-c",
        _SEED_SETTINGS,
        "kiln-jupyterlab",
        # On the runtime's PATH: an image's own (which is how the catalog found it), or on the
        # built-in runtime the one in /opt/kiln/bin, whose #! line names the runtime's
        # interpreter (kiln.runtimes.local.builtin). Notebooks' default kernel runs on that
        # interpreter too: the ``python`` of the terminal and of jobs.
        "jupyter-lab",
        "--no-browser",
        # The runner's port forward reaches the sandbox's own address (slirp's guest), not its
        # loopback; only the forward leads in (the namespace has no other way in).
        "--ip=0.0.0.0",
        f"--port={JUPYTERLAB_PORT}",
        "--ServerApp.port_retries=0",  # another port would be one nobody forwards
        "--ServerApp.base_url=/",
        f"--ServerApp.root_dir={SANDBOX_HOME}",
        # No token or password: Kiln's proxy authenticates every request before it arrives.
        # Both spellings, for images with an older jupyter_server.
        "--IdentityProvider.token=",
        "--ServerApp.token=",
        "--ServerApp.password=",
        # Requests carry the session's public Host (<id>.<content domain>), not a local one.
        "--ServerApp.allow_remote_access=True",
        # The session ends when Kiln stops it, not from a button inside.
        "--ServerApp.quit_button=False",
        # JupyterLab's XSRF check stays on: it keeps other sites' pages (even same-site
        # siblings such as another session) from posting to this one with its cookie.
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=None",  # no news feed, whatever the settings say
        "--LabApp.extension_manager=readonly",  # the runtime's files are read-only anyway
    )
    env = {"JUPYTERLAB_SETTINGS_DIR": JUPYTERLAB_SETTINGS_DIR}
    return EditorProcess(command, JUPYTERLAB_PORT, env, "/api/status")


def editor_process(editor: str) -> EditorProcess:
    return _jupyterlab() if editor == EDITOR_JUPYTERLAB else EditorProcess()


# ---- readiness -----------------------------------------------------------------------------


def endpoint_of(status: pb.WorkloadStatus) -> str:
    """``host:port`` where the web tier reaches the declared port ("" when there is none)."""
    if not status.HasField("endpoint") or not status.endpoint.port:
        return ""
    return f"{status.endpoint.host}:{status.endpoint.port}"


def ports_of(status: pb.WorkloadStatus) -> dict[str, str]:
    """The session's web UI ports as the web tier reaches them: ``{"8100": "host:port"}``."""
    return {
        str(port): f"{found.host}:{found.port}"
        for port, found in status.port_endpoints.items()
        if port in WEB_UI_PORTS and found.port
    }


def answers(endpoint: str, path: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Does an HTTP server answer at ``endpoint`` (``host:port``)? Only a server error or no
    answer at all counts as "not up"."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        return False
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path, headers={"Host": endpoint})
        return connection.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class Readiness(Enum):
    READY = "ready"
    WAITING = "waiting"
    TOO_LATE = "too late"


def poll_editor(
    editor: str,
    endpoint: str,
    started_at: dt.datetime | None,
    now: dt.datetime,
    probe: Callable[[str, str], bool] = answers,
) -> Readiness:
    """One look at a starting session's editor (a running sandbox). Without a port it is ready
    with the sandbox."""
    process = editor_process(editor)
    if not process.port:
        return Readiness.READY
    if endpoint and probe(endpoint, process.ready_path):
        return Readiness.READY
    if started_at is not None and (now - started_at).total_seconds() > EDITOR_START_SECONDS:
        return Readiness.TOO_LATE
    return Readiness.WAITING


def not_ready_reason(editor: str, output_tail: str) -> str:
    why = (
        f"{editor} did not answer on port {editor_process(editor).port} within "
        f"{EDITOR_START_SECONDS:.0f} s"
    )
    return f"{why}; its last output: {output_tail}" if output_tail else why


def output_tail(chunks: Iterable[bytes], limit: int = 400) -> str:
    """The end of a workload's console output, as one line for a timeline entry."""
    data = b""
    for chunk in chunks:
        data = (data + chunk)[-4 * limit :]
    text = data.decode(errors="replace").strip()
    return " ⏎ ".join(line.strip() for line in text.splitlines()[-6:] if line.strip())[-limit:]


def runtime_names(db: Session, ids: set[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    query = select(Runtime.id, Runtime.name).where(Runtime.id.in_(wanted))
    return {row[0]: row[1] for row in db.execute(query)}


def has_web_editor(editor: str) -> bool:
    """Is the editor served over HTTP (through the session proxy)?"""
    return editor_process(editor).port != 0


def editor_last_activity(editor: str, endpoint: str) -> dt.datetime | None:
    """When the editor last saw activity of its own (JupyterLab: a kernel busy or an API
    call), or None when it cannot tell. For the idle timeout: a cell that computes for an
    hour with the browser closed sends no traffic through the proxy, yet is activity. Ask it
    before stopping a web-editor session as idle."""
    host, _, port = endpoint.rpartition(":")
    if editor != EDITOR_JUPYTERLAB or not host or not port.isdigit():
        return None
    connection = http.client.HTTPConnection(host, int(port), timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", "/api/status", headers={"Host": endpoint})
        response = connection.getresponse()
        if response.status != 200:
            return None
        stamp = json.loads(response.read(65536))["last_activity"]
        value = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return None
    finally:
        connection.close()
