"""``exec`` into a workload's pod through the API server (the ``pods/exec`` WebSocket).

The official client's ``WSClient`` speaks the channel protocol (v5 where the server offers
it: ``close_stdin`` then really ends the input); this wraps it in Kiln's ``ExecProcess``.
Exit statuses come from the status channel: ``0`` on success, the ``ExitCode`` cause of a
``NonZeroExitCode`` failure otherwise.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes.stream import stream as k8s_stream
from kubernetes.stream.ws_client import ERROR_CHANNEL, RESIZE_CHANNEL, STDIN_CHANNEL, WSClient

from kiln.runtimes.base import ExecProcess

_POLL = 0.05


def exec_argv(argv: list[str], env: Mapping[str, str] | None) -> list[str]:
    """The command run in the container: Kubernetes' exec has no environment of its own, so
    extra variables go through ``env`` (the container's own environment stays as it is).
    ``--`` ends env's options before the assignments: after one, GNU env takes ``--`` for
    the command (seen on a real node; KWOK runs no exec)."""
    if not env:
        return list(argv)
    return ["env", "--", *(f"{key}={value}" for key, value in env.items()), *argv]


class PodExec(ExecProcess):
    def __init__(
        self,
        core: Any,
        namespace: str,
        pod: str,
        container: str,
        argv: list[str],
        tty: bool,
        rows: int,
        cols: int,
    ) -> None:
        self._client: WSClient = k8s_stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            container=container,
            command=argv,
            stdin=True,
            stdout=True,
            stderr=not tty,
            tty=tty,
            _preload_content=False,
            binary=True,
        )
        self._tty = tty
        self._lock = threading.Lock()
        self._buffer = b""
        self._code: int | None = None
        if tty:
            self.resize(rows, cols)

    def _pump(self, timeout: float) -> None:
        with self._lock:
            if self._client.is_open():
                self._client.update(timeout=timeout)
            for channel in (1, 2):
                data = self._client.read_channel(channel) if self._client.is_open() else ""
                if data:
                    self._buffer += data if isinstance(data, bytes) else data.encode()
            if self._code is None and not self._client.is_open():
                self._code = self._exit_code()

    def _exit_code(self) -> int:
        raw = self._client.read_channel(ERROR_CHANNEL)
        if not raw:
            return 255
        status = json.loads(raw)
        if status.get("status") == "Success":
            return 0
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause.get("message", 255))
        return 255

    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._buffer:
                data, self._buffer = self._buffer[:max_bytes], self._buffer[max_bytes:]
                return data
            if not self._client.is_open():
                self._pump(0)
                if not self._buffer:
                    return b""
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("no output yet")
            self._pump(_POLL)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._client.write_channel(STDIN_CHANNEL, data)

    def close_stdin(self) -> None:
        with self._lock:
            if self._tty:
                self._client.write_channel(STDIN_CHANNEL, b"\x04")
            else:
                self._client.close_channel(STDIN_CHANNEL)

    def resize(self, rows: int, cols: int) -> None:
        if self._tty:
            with self._lock:
                payload = json.dumps({"Height": rows, "Width": cols}).encode()
                self._client.write_channel(RESIZE_CHANNEL, payload)

    def poll(self) -> int | None:
        if self._code is None:
            self._pump(0)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the process is still running")
            self._pump(_POLL)
        assert self._code is not None
        return self._code

    def kill(self) -> None:
        # The API has no signal: closing the stream ends the process (the runtime's exec
        # session is torn down with the connection).
        with self._lock:
            self._client.close()
        if self._code is None:
            self._code = 137

    def close(self) -> None:
        if self._client.is_open():
            self.kill()
