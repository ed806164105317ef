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
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tarfile
import time

HOME = "/home/cdsw"
DEPS = "/opt/kiln/deps"
CODE = "/kiln/in/code.tar"
OUT = "/kiln/out/deps.tar"
PREFIX = "home/cdsw/"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def unpack_code() -> None:
    with tarfile.open(CODE) as tar:
        members = []
        for member in tar:
            if not member.name.startswith(PREFIX):
                continue
            member.name = member.name[len(PREFIX) :]
            if member.name and not member.isdev():
                members.append(member)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and backports)
            tar.extractall(HOME, members=members, filter="data")
        else:  # inside the sandbox: a hostile entry could only reach the sandbox's tmpfs
            tar.extractall(HOME, members=members)  # noqa: S202


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


def write_layer(epoch: int, deps: str = DEPS, out: str = OUT, root: str = "/") -> tuple[int, int]:
    """The deterministic tar of ``deps``, names relative to ``root`` and its parent
    directories first; returns (entries, bytes of file content)."""
    entries = size = 0
    parents = os.path.relpath(deps, root).split("/")[:-1]
    # One statement per context (no parenthesized ``with``): a base's Python may be old.
    with open(out, "wb") as raw:  # noqa: SIM117
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
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


def main() -> int:
    deadline = int(os.environ.get("KILN_BUILD_DEADLINE", "0"))
    if deadline:
        # Ends the whole sandbox (its init follows this process) even if nobody is left to
        # stop it: a builder that died mid-build leaves no everlasting install behind.
        signal.alarm(max(1, deadline - int(time.time())))
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))
    started = time.monotonic()
    unpack_code()
    code = install()
    if code != 0:
        say(f"the install failed (exit code {code})")
        return code if 0 < code < 256 else 1
    say(f"installed in {time.monotonic() - started:.1f} s; writing the dependency layer")
    entries, size = write_layer(epoch)
    say(f"dependency layer: {entries} entries, {size / 1024**2:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
