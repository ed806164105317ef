"""Interactive processes inside a running sandbox (terminals), over a PTY or plain pipes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence

from kiln.runtimes.base import ExecProcess
from kiln.runtimes.local.proc import descendants

HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class LocalExec(ExecProcess):
    """``argv`` is the host-side command (see ``sandbox.exec_argv``); ``env_fd`` is the memfd
    holding the workload environment, inherited by the child and closed here after spawn."""

    def __init__(
        self, argv: Sequence[str], env_fd: int, tty: bool, rows: int = 24, cols: int = 80
    ) -> None:
        self.tty = tty
        self._stdin_closed = False
        # The environment memfd travels as the host side's stdin (see sandbox.EXEC_JOIN).
        # Sessions are made without a controlling terminal here; the sandbox side makes its
        # own and takes the PTY (see sandbox.ENV_LOADER).
        try:
            if tty:
                master, slave = pty.openpty()
                _set_winsize(master, rows, cols)
                try:
                    self._proc = subprocess.Popen(
                        list(argv), stdin=env_fd, stdout=slave, stderr=slave, env=HOST_ENV,
                        start_new_session=True,
                    )  # fmt: skip
                except BaseException:
                    os.close(master)
                    raise
                finally:
                    os.close(slave)
                self._out = self._in = master
            else:
                stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                try:
                    self._proc = subprocess.Popen(
                        list(argv), stdin=env_fd, stdout=subprocess.PIPE, stderr=stdin_r,
                        env=HOST_ENV, start_new_session=True,
                    )  # fmt: skip
                except BaseException:
                    os.close(stdin_w)
                    raise
                finally:
                    os.close(stdin_r)
                assert self._proc.stdout is not None
                self._in, self._out = stdin_w, self._proc.stdout.fileno()
        finally:
            os.close(env_fd)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def fileno(self) -> int:
        """Readable when output (or EOF) is available: for the caller's own select loop."""
        return self._out

    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        if self._out < 0:
            return b""
        readable, _, _ = select.select([self._out], [], [], timeout)
        if not readable:
            raise TimeoutError("no output within the timeout")
        try:
            return os.read(self._out, max_bytes)
        except OSError as exc:
            if exc.errno == errno.EIO:  # the PTY's other side is gone: end of output
                return b""
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._in, view)
            view = view[written:]

    def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        if self.tty:
            self.write(b"\x04")
        else:
            os.close(self._in)
            self._in = -1
        self._stdin_closed = True

    def resize(self, rows: int, cols: int) -> None:
        if self.tty and self._out >= 0:
            _set_winsize(self._out, rows, cols)

    @staticmethod
    def _convention(code: int) -> int:
        return 128 - code if code < 0 else code

    def poll(self) -> int | None:
        code = self._proc.poll()
        return None if code is None else self._convention(code)

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self._convention(self._proc.wait(timeout))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"still running after {timeout}s") from None

    def kill(self) -> None:
        # The sandbox side (nsenter's child) is in the same process group unless a shell made
        # job groups of its own, so signal the descendants individually as well.
        victims = [self._proc.pid, *descendants(self._proc.pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self._proc.poll() is None:
            self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        if self.tty:
            if self._out >= 0:
                os.close(self._out)
        else:
            if self._in >= 0:
                os.close(self._in)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        self._out = self._in = -1


def make_env_fd(script: bytes) -> int:
    """A sealed-in-memory file with the environment script (never on disk)."""
    fd = os.memfd_create("kiln-env", 0)
    os.write(fd, script)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def exec_env(base: Mapping[str, str], extra: Mapping[str, str] | None, tty: bool) -> dict[str, str]:
    env = dict(base)
    if tty:
        env.setdefault("TERM", "xterm-256color")
    if extra:
        env.update(extra)
    return env
