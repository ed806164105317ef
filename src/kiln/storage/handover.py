"""Files the web tier writes while a workload runs must stay writable by that workload.

The web tier writes project files (and git objects) as root; sandboxes run as the workload
uid (``KILN_RUNNER_HOST_UID``). The runtime hands the project tree to that uid before each
start, which covers everything written while nothing ran. While a session or job run is live,
each write through the file API or a git push hands the tree over again at once, so a file
saved in the UI can be edited from the session's terminal (and ``git commit`` there can write
the objects the web tier's commit created) without restarting the session.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from kiln.db.workload_models import Workload
from kiln.runner.states import LIVE_STATES
from kiln.runtimes.local.ownership import adopt_tree
from kiln.settings import Settings

log = logging.getLogger("kiln.storage")

LIVE = [s.value for s in LIVE_STATES]


def has_live_workload(db: Session, project_id: int) -> bool:
    query = select(Workload.id).where(Workload.project_id == project_id, Workload.state.in_(LIVE))
    return db.scalar(query.limit(1)) is not None


def hand_over_if_live(db: Session, settings: Settings, project_id: int, project_dir: Path) -> None:
    """Give ``project_dir`` to the workload uid now if a workload of the project is live."""
    if os.geteuid() != 0 or not has_live_workload(db, project_id):
        return  # not root: nothing to hand over; nothing live: the next start does it
    uid = settings.runner.host_uid
    try:
        adopt_tree(project_dir, uid, uid)
    except OSError as exc:  # the write itself succeeded; the next start retries
        log.warning("could not hand %s to uid %d: %s", project_dir, uid, exc)
