"""Host process helpers that stay correct when pids are reused.

A pid alone is not an identity: after a runner restart the pid in a stored state may belong
to a different process. Every stored pid is paired with its start time (clock ticks since
boot, /proc/PID/stat field 22), and nothing is signalled unless both match.
"""

from __future__ import annotations

import contextlib
import os
import signal


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


def same_process(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


def running(pid: int, started: int | None) -> bool:
    """The recorded process exists and has not exited (a zombie has: once its parent is gone
    it waits for the host's init to reap it, which can take seconds)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    return started is not None and int(fields[19]) == started and fields[0] not in (b"Z", b"X")


def open_pidfd(pid: int, started: int | None) -> int | None:
    """A pidfd for the process if it still is the one recorded, else None."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if not same_process(pid, started):
        os.close(fd)
        return None
    return fd


def signal_pidfd(pidfd: int, sig: int) -> bool:
    """Signal through a pidfd (immune to pid reuse); False when the process is gone."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    return True


def signal_checked(pid: int, started: int | None, sig: int) -> bool:
    fd = open_pidfd(pid, started)
    if fd is None:
        return False
    try:
        return signal_pidfd(fd, sig)
    finally:
        os.close(fd)


def reap(pid: int) -> int | None:
    """waitpid if it is our child; the raw status, or None if not ours / not yet exited."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done == pid else None


def children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(p) for p in f.read().split()]
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (used when there is no cgroup to list them)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        for kid in children(stack.pop()):
            found.append(kid)
            stack.append(kid)
    return found


def shell_status(raw: int) -> int:
    """A waitpid status in the shell's convention (signal N → 128+N)."""
    if os.WIFSIGNALED(raw):
        return 128 + os.WTERMSIG(raw)
    return os.WEXITSTATUS(raw)
