"""The web tier's side of the builder's gRPC API: ``Wake`` and the build log.

One ``BuilderClient`` per web process (``builder_client(app.state, settings)``), speaking
mutual TLS as ``spiffe://kiln/web`` to ``settings.builder`` host/port. gRPC failures become
domain errors: an unknown build's log is a 404, a builder that is down a 503.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator
from typing import Any

import grpc

from kiln.domain.errors import InvalidInput, KilnError, NotFound
from kiln.rpc import builder_pb2 as pb
from kiln.rpc.builder_pb2_grpc import BuilderStub
from kiln.rpc.client import LazyServiceChannel
from kiln.rpc.identity import Service
from kiln.settings import Settings

WAKE_TIMEOUT = 2.0
LOG_TIMEOUT = 10.0


class BuilderUnavailable(KilnError):
    """The builder cannot be reached or refused us (down, wrong port, certificates)."""

    status = 503
    title = "Builder unavailable"


def builder_error(exc: grpc.RpcError, what: str) -> KilnError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else "") or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(f"{what}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return BuilderUnavailable(f"{what}: the builder is not reachable ({details[:200]})")
    return BuilderUnavailable(f"{what}: the builder failed ({code.name}: {details[:200]})")


class BuilderClient:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        address = f"{settings.builder.host}:{settings.builder.port}"
        self._channel = LazyServiceChannel(settings, Service.BUILDER, address)

    def _stub(self) -> BuilderStub:
        try:
            return BuilderStub(self._channel.get())
        except (OSError, ValueError) as exc:
            raise BuilderUnavailable(f"no client certificate for the builder: {exc}") from None

    def wake(self) -> None:
        """Nudge the builder (best effort: it also looks at the queue every few seconds)."""
        with contextlib.suppress(grpc.RpcError, KilnError):
            self._stub().Wake(pb.WakeRequest(), timeout=WAKE_TIMEOUT)

    def logs(
        self, build_id: str, offset: int = 0, follow: bool = False
    ) -> Generator[bytes, None, None]:
        """A build's log from byte ``offset``; with ``follow`` until the build has ended."""
        request = pb.BuildLogRequest(build_id=build_id, offset=offset, follow=follow)
        call: Any = self._stub().StreamBuildLog(request, timeout=None if follow else LOG_TIMEOUT)
        try:
            for chunk in call:
                yield chunk.data
        except grpc.RpcError as exc:
            raise builder_error(exc, "the builder could not read the log") from None
        finally:
            call.cancel()

    def ping(self) -> None:
        """Raise ``BuilderUnavailable`` unless the builder answers (before a response starts)."""
        try:
            self._stub().Ping(pb.PingRequest(), timeout=LOG_TIMEOUT)
        except grpc.RpcError as exc:
            raise builder_error(exc, "the builder does not answer") from None

    def close(self) -> None:
        self._channel.close()


_create_lock = threading.Lock()


def builder_client(state: Any, settings: Settings) -> BuilderClient:
    """The process's client, kept on ``app.state`` and created on first use."""
    client: BuilderClient | None = getattr(state, "builder_client", None)
    if client is None:
        with _create_lock:
            client = getattr(state, "builder_client", None)
            if client is None:
                client = BuilderClient(settings)
                state.builder_client = client
    return client
