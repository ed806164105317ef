"""Workers die with their parent.

A workload started with ``parent_workload_id`` (a worker of a session) is accepted only while
its parent runs in this runner for the same project. From then on the runner's watchdog looks
every second: a child whose parent is no longer running — stopped, ended, lost, unknown — is
stopped. The parent's id is part of the child's saved record, so this holds after a runner
restart too (re-attached children of a parent that ended meanwhile are stopped at the first
look). Level-triggered, like the rest of the runner: nothing depends on seeing the moment the
parent ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.runner.service import Record

log = logging.getLogger("kiln.runner")

ORPHAN_GRACE = 10.0  # seconds between SIGTERM and SIGKILL, as for any stop


def parent_refusal(
    child_project: int, parent_id: str, parent: Record | None, running: Callable[[Record], bool]
) -> str | None:
    """Why a child of ``parent_id`` may not start now, or None."""
    if parent is None:
        return f"parent workload {parent_id[:80]!r} is not known to this runner"
    if parent.project_id != child_project:
        return f"parent workload {parent_id[:80]!r} belongs to another project"
    if not running(parent):
        return f"parent workload {parent_id[:80]!r} is not running"
    return None


class OrphanReaper:
    """Stops children whose parent ended, each in a thread of its own: a stop waits out its
    grace period, and one stubborn worker must not hold up the others (or the deadlines)."""

    def __init__(self, stop: Callable[[Record, str, float], None]) -> None:
        self._stop = stop
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def sweep(self, records: Iterable[Record], running: Callable[[Record], bool]) -> list[str]:
        """Start stopping every orphan; returns their ids (those not already being stopped)."""
        by_id = {r.workload_id: r for r in records}
        orphans = [
            child
            for child in by_id.values()
            if child.parent_id
            and running(child)
            and not (child.parent_id in by_id and running(by_id[child.parent_id]))
        ]
        started = []
        for child in orphans:
            with self._lock:
                if child.workload_id in self._busy:
                    continue
                self._busy.add(child.workload_id)
            thread = threading.Thread(target=self._end, args=(child,), daemon=True)
            thread.name = f"orphan-{child.workload_id}"[:60]
            thread.start()
            started.append(child.workload_id)
        return started

    def _end(self, child: Record) -> None:
        try:
            log.info("parent %s of %s ended: stopping it", child.parent_id, child.workload_id)
            self._stop(child, f"its parent {child.parent_id} ended", ORPHAN_GRACE)
        except Exception:
            log.exception("stopping %s after its parent ended failed", child.workload_id)
        finally:
            with self._lock:
                self._busy.discard(child.workload_id)
