"""One thread that watches every workload: their output pipes and their exits.

Exits arrive as pidfds (readable when the process ends — also for processes that are not our
children, which is what re-attached workloads are), output as FIFO read ends. One epoll, one
thread, whatever the number of workloads: no poller per workload.

Each ready output pipe gets one bounded read per round, so a workload that prints without end
cannot starve the others' logs or exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable

log = logging.getLogger("kiln.runtimes.local")

Callback = Callable[[int], None]


class Watcher:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending: list[Callable[[], None]] = []
        self._periodic: list[Callable[[], None]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kiln-local-watcher", daemon=True)
        self._thread.start()

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the watcher thread (all selector changes happen there)."""
        if self.in_thread():
            fn()
            return
        with self._lock:
            self._pending.append(fn)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def add(self, fd: int, callback: Callback) -> None:
        def register() -> None:
            self._selector.register(fd, selectors.EVENT_READ, callback)

        self.call_soon(register)

    def discard(self, fd: int) -> None:
        """Stop watching ``fd`` (the caller still owns and closes it)."""

        def remove() -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)

        self.call_soon(remove)

    def every_second(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` about once a second in the watcher thread (cleanup that may be busy)."""
        self.call_soon(lambda: self._periodic.append(fn))

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if not self.in_thread():
            self._thread.join(timeout=10)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        last_periodic = time.monotonic()
        while not self._stopping:
            try:
                events = self._selector.select(timeout=1.0)
            except OSError as exc:  # a registered fd was closed under us: drop stale ones
                log.warning("watcher select failed: %s", exc)
                self._drop_closed()
                continue
            with self._lock:
                pending, self._pending = self._pending, []
            for fn in pending:
                self._guard(fn)
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                callback: Callback = key.data
                self._guard(lambda cb=callback, fd=key.fd: cb(fd))  # type: ignore[misc]
            if time.monotonic() - last_periodic >= 1.0:
                last_periodic = time.monotonic()
                for fn in self._periodic:
                    self._guard(fn)

    def _drop_closed(self) -> None:
        for key in list(self._selector.get_map().values()):
            try:
                os.fstat(key.fd)
            except OSError:
                self._selector.unregister(key.fd)

    @staticmethod
    def _guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("local runtime watcher callback failed")
