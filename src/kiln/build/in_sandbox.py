"""The dependency step of a build, as it runs *inside* the build sandbox.

Kiln never imports this module: the builder binds the file read-only into the sandbox and the
base image's own ``python3`` runs it as the unprivileged build user. Standard library only.

1. Unpack the snapshot (``/kiln/in/code.tar``, made by ``git archive``) into ``/home/cdsw``.
2. Run the project's ``cdsw-build.sh`` if it has one (CML's hook; it usually runs
   ``pip3 install -r requirements.txt``), else ``pip install -r requirements.txt``. The
   environment sends every ``pip install`` to ``/opt/kiln/deps`` (``PIP_USER`` with
   ``PYTHONUSERBASE``), the only writable place besides ``/tmp`` and ``/home/cdsw``.
3. Write ``/opt/kiln/deps`` as a reproducible tar to ``/kiln/out/deps.tar``: entries sorted,
   mtimes fixed (``SOURCE_DATE_EPOCH``), owner root, modes 0755/0644, symlinks kept as they
   are. Kiln only hashes and compresses these bytes.

Whatever happens here stays in the sandbox: a failing step exits non-zero with the tool's
own message in the log; the builder reports it.

In a cluster (``pod_install.py``) the same steps run in a pod, one ``exec`` through the API
server each, since nothing can be bound into a pod from the builder's disk:

- ``hold``: the pod's own command; it only keeps the pod up until the builder is done (or
  the deadline passes) and ends on SIGTERM;
- ``unpack``: the snapshot arrives on stdin (a stream: it is never stored whole);
- ``install``: step 2, its output the build log;
- ``layer``: step 3, the tar written to stdout (nothing else is: stderr goes nowhere).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from typing import BinaryIO

HOME = "/home/cdsw"
DEPS = "/opt/kiln/deps"
CODE = "/kiln/in/code.tar"
OUT = "/kiln/out/deps.tar"
PREFIX = "home/cdsw/"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def unpack_code(source: BinaryIO, home: str = HOME) -> int:
    """Extract the snapshot's ``home/cdsw/`` entries into ``home``, reading ``source`` as a
    stream (no seeking: it may be a pipe); returns the number of entries."""
    count = 0
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            if not member.name.startswith(PREFIX):
                continue
            member.name = member.name[len(PREFIX) :]
            if not member.name or member.isdev():
                continue
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and backports)
                tar.extract(member, home, filter="data")
            else:  # inside the sandbox: a hostile entry could only reach the sandbox's tmpfs
                tar.extract(member, home)
            count += 1
    return count


def install() -> int:
    if os.path.lexists(os.path.join(HOME, "cdsw-build.sh")):
        say("running cdsw-build.sh")
        return subprocess.call(["bash", "cdsw-build.sh"], cwd=HOME)
    if os.path.lexists(os.path.join(HOME, "requirements.txt")):
        say("installing requirements.txt with pip")
        return subprocess.call(
            [sys.executable, "-m", "pip", "install", "-r", "requirements.txt"], cwd=HOME
        )
    say("no cdsw-build.sh or requirements.txt: nothing to install")
    return 0


def _info(name: str, kind: bytes, mode: int, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, epoch
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_layer(epoch: int, out: BinaryIO, deps: str = DEPS, root: str = "/") -> tuple[int, int]:
    """The deterministic tar of ``deps`` written to ``out`` as a stream (a file or a pipe),
    names relative to ``root`` and its parent directories first; returns (entries, bytes of
    file content)."""
    entries = size = 0
    parents = os.path.relpath(deps, root).split("/")[:-1]
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for depth in range(1, len(parents) + 1):
            tar.addfile(_info("/".join(parents[:depth]), tarfile.DIRTYPE, 0o755, epoch))
        for walked, dirs, files in os.walk(deps):
            dirs.sort()
            links = [d for d in dirs if os.path.islink(os.path.join(walked, d))]
            dirs[:] = [d for d in dirs if d not in links]  # never descend into a link
            rel_root = os.path.relpath(walked, root)
            tar.addfile(_info(rel_root, tarfile.DIRTYPE, 0o755, epoch))
            entries += 1
            for name in sorted(files + links):
                added = _add_entry(tar, os.path.join(walked, name), f"{rel_root}/{name}", epoch)
                if added is not None:
                    entries += 1
                    size += added
    return entries, size


def _add_entry(tar: tarfile.TarFile, path: str, name: str, epoch: int) -> int | None:
    """Add a file or a symlink (as the link itself); the bytes of content added, or None
    for what an image needs not (sockets, FIFOs)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        info = _info(name, tarfile.SYMTYPE, 0o777, epoch)
        info.linkname = os.readlink(path)
        tar.addfile(info)
        return 0
    if not stat.S_ISREG(st.st_mode):
        return None
    info = _info(name, tarfile.REGTYPE, 0o755 if st.st_mode & stat.S_IXUSR else 0o644, epoch)
    info.size = st.st_size
    with open(path, "rb") as f:
        tar.addfile(info, f)
    return st.st_size


def _set_deadline() -> None:
    """Ends this process at the build's deadline even if nobody is left to stop it: a
    builder that died mid-build leaves no everlasting install (or pod) behind."""
    deadline = int(os.environ.get("KILN_BUILD_DEADLINE", "0"))
    if deadline:
        signal.alarm(max(1, deadline - int(time.time())))


def _epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))


def run_install() -> int:
    """Step 2, with its messages; the exit code to end with."""
    started = time.monotonic()
    code = install()
    if code != 0:
        say(f"the install failed (exit code {code})")
        return code if 0 < code < 256 else 1
    say(f"installed in {time.monotonic() - started:.1f} s; writing the dependency layer")
    return 0


def main() -> int:
    """The local sandbox: every step in one run."""
    _set_deadline()
    with open(CODE, "rb") as code:
        unpack_code(code)
    status = run_install()
    if status != 0:
        return status
    with open(OUT, "wb") as out:
        entries, size = write_layer(_epoch(), out)
    say(f"dependency layer: {entries} entries, {size / 1024**2:.1f} MiB")
    return 0


def hold() -> int:
    """A build pod's command: up until SIGTERM (the builder deletes the pod) or the
    deadline. It is the container's PID 1, which ignores signals it has no handler for."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, lambda *_: sys.exit(0))
    _set_deadline()
    while True:
        signal.pause()


def unpack() -> int:
    say(f"unpacked the project: {unpack_code(sys.stdin.buffer)} entries")
    return 0


def layer() -> int:
    """The tar on stdout: so that no warning can corrupt it, stderr goes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    write_layer(_epoch(), sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


def install_step() -> int:
    _set_deadline()
    return run_install()


def pod_step(step: str) -> int:
    steps: dict[str, Callable[[], int]] = {
        "hold": hold,
        "unpack": unpack,
        "install": install_step,
        "layer": layer,
    }
    if step not in steps:
        print(f"unknown step {step!r}", file=sys.stderr)
        return 2
    return steps[step]()


if __name__ == "__main__":
    sys.exit(pod_step(sys.argv[1]) if len(sys.argv) > 1 else main())
