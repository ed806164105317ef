"""CML's Workers API inside a Kiln session: run Python on more sandboxes of your project.

    from kiln.sdk import workers

    launched = workers.launch_workers(2, cpu=0.5, memory=1, code="print(42)")
    result = workers.await_workers(launched, timeout_seconds=600)
    for worker in result["workers"]:           # the ones that succeeded
        print(worker["id"], worker["state"], worker["exit_code"])
    for worker in result["failures"]:          # failed, stopped, or still running at the timeout
        print(worker["id"], worker["state"], worker["reason"])
    workers.list_workers()                     # every worker of this session
    workers.stop_workers()                     # stop them all (or name some)

Each worker is a sandbox of its own with the project's files at ``/home/cdsw`` and the
project's environment, running ``python3 SCRIPT [ARGS]`` or ``python3 -c CODE``. Workers
stop when they finish, when you stop them, or when this session ends. A worker is a plain
dict: ``id``, ``state`` (queued, starting, running, succeeded, failed, timed_out, stopped),
``reason``, ``exit_code``, ``cpu``, ``memory`` (GiB), ``command``, ``ip_address`` (None: on
the local runtime a worker has no network address others can reach), ``created_at``,
``started_at``, ``ended_at``.

This works only inside a Kiln session: Kiln sets ``KILN_API_URL`` and ``KILN_WORKERS_TOKEN``
there. The token can do nothing but this, for this session's project, while the session
lives. Errors raise ``WorkersError`` with the server's explanation.

The module uses the standard library only (``urllib``), so it runs in any runtime image,
including ones without ``httpx`` or ``requests``.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "WorkersError",
    "await_workers",
    "launch_workers",
    "list_workers",
    "stop_workers",
]

Worker = dict[str, Any]
WorkerRef = str | Mapping[str, Any]

ENDED = frozenset({"succeeded", "failed", "timed_out", "stopped"})
POLL_SECONDS = 1.0
# Starting many sandboxes takes a while; every other call is quick.
LAUNCH_TIMEOUT = 600.0
REQUEST_TIMEOUT = 60.0


class WorkersError(Exception):
    """A Workers API call failed; ``status`` is the HTTP status (0: Kiln not reachable)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def launch_workers(
    n: int,
    cpu: float,
    memory: float,
    nvidia_gpu: int = 0,
    kernel: str = "python3",
    script: str = "",
    code: str = "",
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> list[Worker]:
    """Start ``n`` workers, each with ``cpu`` vCPU and ``memory`` GiB, running either
    ``script`` (a path in the project, with ``args``) or ``code`` (Python source). ``env``
    is added to the project's environment. Returns the workers as started (or failed to
    start: see ``state`` and ``reason``). Nothing starts when the request is refused."""
    body = {
        "n": n,
        "cpu": cpu,
        "memory": memory,
        "nvidia_gpu": nvidia_gpu,
        "kernel": kernel,
        "script": script or None,
        "code": code or None,
        "args": list(args),
        "env": dict(env or {}),
    }
    reply = _call("POST", "", body, timeout=LAUNCH_TIMEOUT)
    workers: list[Worker] = reply["workers"]
    return workers


def list_workers() -> list[Worker]:
    """Every worker this session launched, oldest first, as it is now."""
    workers: list[Worker] = _call("GET", "")["workers"]
    return workers


def await_workers(
    ids: WorkerRef | Iterable[WorkerRef],
    wait_for_completion: bool = True,
    timeout_seconds: float = 0,
) -> dict[str, list[Worker]]:
    """Wait until the workers have ended (``wait_for_completion=False``: until they run).

    ``ids``: worker ids or worker dicts (what ``launch_workers`` returned). Returns
    ``{"workers": [...], "failures": [...]}``: those that succeeded (or run), and those that
    failed, were stopped, or had not got there when ``timeout_seconds`` (0: no limit) passed.
    """
    wanted = _ids(ids)
    if not wanted:
        return {"workers": [], "failures": []}
    deadline = time.monotonic() + timeout_seconds if timeout_seconds > 0 else None
    while True:
        current = _call("GET", "?" + urllib.parse.urlencode([("id", i) for i in wanted]))
        workers: list[Worker] = current["workers"]
        if all(_arrived(w, wait_for_completion) for w in workers):
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        pause = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
        time.sleep(max(pause, 0.0))
    done = [w for w in workers if _good(w, wait_for_completion)]
    return {"workers": done, "failures": [w for w in workers if w not in done]}


def stop_workers(*ids: WorkerRef | Iterable[WorkerRef]) -> list[Worker]:
    """Stop the named workers (ids or worker dicts), or every live worker of this session
    when none is named. Returns them in their final state."""
    wanted = [i for group in ids for i in _ids(group)]
    query = "?" + urllib.parse.urlencode([("id", i) for i in wanted]) if wanted else ""
    workers: list[Worker] = _call("DELETE", query)["workers"]
    return workers


# ---- plumbing ----------------------------------------------------------------------------


def _arrived(worker: Worker, wait_for_completion: bool) -> bool:
    return worker["state"] in ENDED or (not wait_for_completion and worker["state"] == "running")


def _good(worker: Worker, wait_for_completion: bool) -> bool:
    if wait_for_completion:
        return bool(worker["state"] == "succeeded")
    return worker["state"] in ("running", "succeeded")


def _ids(ids: WorkerRef | Iterable[WorkerRef]) -> list[str]:
    if isinstance(ids, str | Mapping):
        ids = [ids]
    result = []
    for item in ids:
        worker_id = item.get("id") if isinstance(item, Mapping) else item
        if not isinstance(worker_id, str) or not worker_id:
            raise WorkersError(f"not a worker or worker id: {item!r}")
        result.append(worker_id)
    return result


def _settings() -> tuple[str, str]:
    url, token = os.environ.get("KILN_API_URL", ""), os.environ.get("KILN_WORKERS_TOKEN", "")
    if not url or not token:
        raise WorkersError(
            "the Workers API works only inside a Kiln session (KILN_API_URL and "
            "KILN_WORKERS_TOKEN are not set)"
        )
    return url.rstrip("/") + "/api/v1/workers", token


def _tls() -> ssl.SSLContext:
    # Kiln's own CA signs the web tier's certificate; the session is given a bundle with it.
    # Verification stays on: a bundle that does not fit is an error, never a reason to skip.
    bundle = os.environ.get("KILN_CA_BUNDLE") or None
    return ssl.create_default_context(cafile=bundle)


def _call(
    method: str, suffix: str, body: Any = None, timeout: float = REQUEST_TIMEOUT
) -> dict[str, Any]:
    base, token = _settings()
    request = urllib.request.Request(  # noqa: S310  (the URL is Kiln's, https from the env)
        base + suffix,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        },
    )
    context = _tls() if base.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            reply: dict[str, Any] = json.loads(response.read() or b"{}")
            return reply
    except urllib.error.HTTPError as exc:
        raise WorkersError(f"{exc.code}: {_detail(exc)}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WorkersError(f"cannot reach Kiln at {base}: {reason}") from None


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        problem = json.loads(error.read())
        return str(problem.get("detail") or problem.get("title") or error.reason)
    except (ValueError, AttributeError, OSError):
        return str(error.reason)
