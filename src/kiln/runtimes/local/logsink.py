"""A workload's console log on the host: appended by the watcher, capped, readable live.

The cap protects the host's disk from a workload that prints without end. Past it the watcher
keeps *reading* the workload's output (so the workload never blocks on a full pipe and keeps
running at full speed) but throws the bytes away, writes one marker line, and records that
the log was truncated — in a flag file too, so a re-attached runner knows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 256 * 1024


def marker(cap: int) -> bytes:
    return f"\n[kiln: output truncated after {cap} bytes; later output was discarded]\n".encode()


class LogSink:
    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self._flag = path.with_name(path.name + ".truncated")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size  # continue after a runner restart
        self.truncated = self._flag.exists()
        self.discarded = 0
        self.finished = False
        self._cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        """Called only from the watcher thread."""
        if self._fd < 0:
            return  # finished meanwhile (a terminal's last output after the workload ended)
        if self.truncated:
            self.discarded += len(data)
            return
        room = self.cap - self.size
        keep = data[: max(room, 0)]
        if keep:
            os.write(self._fd, keep)
        if len(data) > len(keep):
            self.discarded += len(data) - len(keep)
            self.truncated = True
            self._flag.touch(mode=0o600)
            os.write(self._fd, marker(self.cap))
        with self._cond:
            self.size = os.fstat(self._fd).st_size
            self._cond.notify_all()

    def finish(self) -> None:
        """No more output will come (the workload ended, or this runtime is closing)."""
        with self._cond:
            self.finished = True
            self._cond.notify_all()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, since: int, follow: bool, poll: float = 0.5) -> Iterator[bytes]:
        """Bytes from offset ``since``; with ``follow`` until finished and fully read."""
        with open(self.path, "rb") as f:
            f.seek(max(since, 0))
            while True:
                chunk = f.read(CHUNK)
                if chunk:
                    yield chunk
                    continue
                if not follow:
                    return
                with self._cond:
                    if self.finished and f.tell() >= self.size:
                        return
                    if f.tell() >= self.size:
                        self._cond.wait(poll)
