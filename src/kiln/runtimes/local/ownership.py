"""Giving the project directory to the workload uid.

The workload runs as an unprivileged host uid and must be able to change every file of its
project, including files the web tier (root) wrote since the last run. Before each start the
tree is walked and whatever the workload uid does not own is handed over.

The walk is safe against a workload that plants symlinks or swaps directories while it runs
(``os.fwalk`` works on directory file descriptors and never follows symlinks; ``chown`` is
done relative to those descriptors without following links). A regular file with several hard
links is skipped: it may be a link to a file outside the project.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("kiln.runtimes.local")


def adopt_tree(root: Path, uid: int, gid: int) -> int:
    """chown everything under ``root`` (and root itself) to uid:gid; returns how many entries
    changed. Raises ``NotADirectoryError`` if ``root`` is not a real directory."""
    top = os.lstat(root)
    if not stat.S_ISDIR(top.st_mode):
        raise NotADirectoryError(f"project directory {root} is not a directory")
    changed = 0
    if (top.st_uid, top.st_gid) != (uid, gid):
        os.chown(root, uid, gid, follow_symlinks=False)
        changed += 1
    for _, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirs, *files):
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if (st.st_uid, st.st_gid) == (uid, gid):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                log.warning("not adopting %s/%s: it has %d hard links", root, name, st.st_nlink)
                continue
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            changed += 1
    return changed
