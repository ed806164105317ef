"""The web tier's side of the runner's gRPC API.

One ``RunnerClient`` per web process (``runner_client(app)`` creates it lazily on
``app.state``): it speaks mutual TLS as ``spiffe://kiln/web`` to ``settings.runner``
host/port, making sure the web certificate exists (and is not due for renewal) on first use.
gRPC failures become ``kiln.domain.errors`` subclasses, so routes never see a raw
``grpc.RpcError`` and a runner that is down is a clean 503, not a 500.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Generator, Iterator
from typing import Any, Protocol

import grpc

from kiln.domain.errors import Conflict, InvalidInput, KilnError, NotFound
from kiln.rpc import runner_pb2 as pb
from kiln.rpc.client import LazyServiceChannel
from kiln.rpc.identity import Service
from kiln.rpc.runner_pb2_grpc import RunnerStub
from kiln.settings import Settings

# A sandbox start builds a bubblewrap sandbox and cgroup: normally well under a second, but a
# busy host may take a while; past this the session fails with a clear reason.
START_TIMEOUT = 60.0
STATUS_TIMEOUT = 10.0
WAKE_TIMEOUT = 2.0
STOP_GRACE_SECONDS = 5
# StopWorkload blocks until the workload is gone: SIGTERM, the grace, SIGKILL, reaping.
STOP_TIMEOUT = STOP_GRACE_SECONDS + 20.0


class RunnerUnavailable(KilnError):
    """The runner cannot be reached or refused us (down, wrong port, certificate trouble)."""

    status = 503
    title = "Runner unavailable"


class RunnerRefused(Conflict):
    """The runner could not do it for a reason the user should read (e.g. no sandbox)."""

    title = "Runner refused"


def runner_error(exc: grpc.RpcError, what: str) -> KilnError:
    """The domain error for a failed call; its detail is a sentence for the user."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
    return error_for(code, details, what)


def error_for(code: grpc.StatusCode, details: str, what: str) -> KilnError:
    """The domain error for a gRPC status code (also used in-process, without a call)."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"{what}: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}")
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return RunnerRefused(f"{what}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RunnerUnavailable(f"{what}: the runner did not answer in time")
    if code == grpc.StatusCode.UNAVAILABLE:
        return RunnerUnavailable(f"{what}: the runner is not reachable ({details[:200]})")
    # PERMISSION_DENIED/UNAUTHENTICATED are a misconfigured site (certificates), UNKNOWN and
    # INTERNAL a runner bug: the user can only retry later, the operator reads the logs.
    return RunnerUnavailable(f"{what}: the runner failed ({code.name}: {details[:200]})")


class ExecCall(Protocol):
    """A running Exec: iterate for output; ``cancel()`` ends it (the process is killed)."""

    def __iter__(self) -> Iterator[pb.ExecOutput]: ...

    def __next__(self) -> pb.ExecOutput: ...

    def cancel(self) -> bool: ...


class RunnerClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channel = LazyServiceChannel(settings, Service.RUNNER, self.target)

    @property
    def target(self) -> str:
        return f"{self.settings.runner.host}:{self.settings.runner.port}"

    def _stub(self) -> RunnerStub:
        try:
            return RunnerStub(self._channel.get())
        except (OSError, ValueError) as exc:  # the CA or the certificate files are unusable
            raise RunnerUnavailable(f"no client certificate for the runner: {exc}") from None

    def _unary(self, method: str, request: Any, timeout: float, what: str) -> Any:
        try:
            return getattr(self._stub(), method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise runner_error(exc, what) from None

    def start(self, spec: pb.WorkloadSpec) -> pb.WorkloadStatus:
        """Start (idempotent on ``spec.workload_id``); returns once the command runs."""
        status: pb.WorkloadStatus = self._unary(
            "StartWorkload",
            pb.StartWorkloadRequest(spec=spec),
            START_TIMEOUT,
            "the runner could not start the workload",
        )
        return status

    def status(self, workload_id: str, timeout: float = STATUS_TIMEOUT) -> pb.WorkloadStatus:
        """``timeout``: shorter where the answer is only nice to have (a page's extras)."""
        status: pb.WorkloadStatus = self._unary(
            "GetStatus",
            pb.GetStatusRequest(workload_id=workload_id),
            timeout,
            "the runner could not report on the workload",
        )
        return status

    def stop(self, workload_id: str, reason: str, grace: float | None = None) -> pb.WorkloadStatus:
        """Stop and wait until the workload is gone; stopping an ended one is harmless."""
        seconds = math.ceil(grace or STOP_GRACE_SECONDS)  # whole seconds on the wire
        status: pb.WorkloadStatus = self._unary(
            "StopWorkload",
            pb.StopWorkloadRequest(workload_id=workload_id, grace_seconds=seconds, reason=reason),
            STOP_TIMEOUT - STOP_GRACE_SECONDS + seconds,
            "the runner could not stop the workload",
        )
        return status

    def wake(self) -> None:
        """Nudge the runner's reconciler (best effort: it also looks every second or so)."""
        with contextlib.suppress(grpc.RpcError, KilnError):
            self._stub().Wake(pb.WakeRequest(), timeout=WAKE_TIMEOUT)

    def logs(
        self, workload_id: str, offset: int = 0, follow: bool = False
    ) -> Generator[bytes, None, None]:
        """A workload's stored console output from byte ``offset``; with ``follow``, more as
        it comes until the workload ends. Errors are domain errors (404 unknown id, 503)."""
        request = pb.StreamLogsRequest(workload_id=workload_id, offset=offset, follow=follow)
        call = self._stub().StreamLogs(request, timeout=None if follow else STATUS_TIMEOUT)
        try:
            for chunk in call:
                yield chunk.data
        except grpc.RpcError as exc:
            raise runner_error(exc, "the runner could not read the log") from None
        finally:
            call.cancel()

    def exec(self, requests: Iterator[pb.ExecInput]) -> ExecCall:
        """Open an interactive Exec; the first request must be ``start``. Errors surface
        while iterating the result, as ``grpc.RpcError`` (map them with ``runner_error``)."""
        call: ExecCall = self._stub().Exec(requests)
        return call

    def close(self) -> None:
        self._channel.close()


_create_lock = threading.Lock()


def runner_client(state: Any, settings: Settings) -> RunnerClient:
    """The process's client, kept on ``app.state`` (``state``) and created on first use."""
    client: RunnerClient | None = getattr(state, "runner_client", None)
    if client is None:
        with _create_lock:
            client = getattr(state, "runner_client", None)
            if client is None:
                client = RunnerClient(settings)
                state.runner_client = client
    return client
