"""Build an internal gRPC server: mutual TLS, identity authorization, nothing in clear text."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, Protocol

import grpc

from kiln.rpc.authz import IdentityAuthorization, Policy
from kiln.rpc.identity import CertFiles
from kiln.rpc.tls import server_credentials

# Streams (logs, exec) each hold a worker thread for their whole life, so the pool bounds how
# many can be open at once; a call beyond it waits, it is not refused.
DEFAULT_MAX_WORKERS = 64


def secure_server(
    files: CertFiles,
    address: str,
    policy: Policy,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    options: list[tuple[str, Any]] | None = None,
) -> tuple[grpc.Server, int]:
    """A not-yet-started server listening on ``address`` (``host:port``, port 0 = any free
    port) with the servicers still to be added. Returns (server, bound port)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[IdentityAuthorization(policy)],
        options=options or [],
    )
    port: int = server.add_secure_port(address, server_credentials(files))
    if port == 0:  # older grpcio reports a failed bind this way instead of raising
        raise OSError(f"cannot listen on {address}")
    return server, port


class Stoppable(Protocol):
    def stop(self) -> None: ...


def serve_until_signalled(start: Callable[[], Stoppable], log: logging.Logger) -> None:
    """Start a service (``start()`` returns once it serves), run until SIGTERM or SIGINT,
    then stop it: the body of ``kiln runner`` and ``kiln builder``."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    running = start()
    try:
        stopping.wait()
    finally:
        running.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
