"""The model router's request statistics, as one web process keeps them: counted in memory on
each call, added to the database every ``KILN_MODELS_STATS_FLUSH_SECONDS`` and when the
process stops (``kiln.domain.model_stats`` says what is counted and how rows add up).

The router's own overhead must stay under a millisecond, so a call costs a lock, a dict
look-up and a few additions here; no call waits on the database. The writer is a daemon
thread, started by a call and ending after a quiet period (a process that routes no calls
holds none).
If the database is away, counts are kept for the next flush (up to ``MAX_PENDING`` keys,
beyond which the oldest flush's counts are dropped, logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from kiln.domain import model_stats
from kiln.domain.model_stats import Tally

log = logging.getLogger("kiln.serving.request_stats")

MAX_PENDING = 50_000  # (model, replica, minute) keys held while the database is away

Key = tuple[int, str, int]  # model id, replica workload id ("" when refused), Unix minute


class RequestStats:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        flush_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Key, Tally] = {}
        self._writer: threading.Thread | None = None
        self._closing = threading.Event()

    # ---- the hot path -----------------------------------------------------------------

    def record(self, model_id: int, replica_id: str, result: str, seconds: float) -> None:
        """Count one call of ``model_id`` answered by ``replica_id`` ("" when the router
        answered itself), ended as ``result`` (``model_stats.outcome``), after ``seconds``."""
        key = (model_id, replica_id, int(self.clock() // 60))
        with self._lock:
            tally = self._pending.get(key)
            if tally is None:
                tally = self._pending[key] = Tally()
            tally.count(result, seconds * 1000.0)
            start = self._writer is None and not self._closing.is_set()
            if start:
                self._writer = threading.Thread(
                    target=self._write_loop, name="kiln-model-stats", daemon=True
                )
        if start:
            assert self._writer is not None
            self._writer.start()

    # ---- the writer -------------------------------------------------------------------

    def flush(self) -> int:
        """Add what was counted since the last flush to the database; the rows written. On
        a database error the counts go back to be added next time."""
        with self._lock:
            counts, self._pending = self._pending, {}
        if not counts:
            return 0
        try:
            with self.sessions() as db:
                written = model_stats.add_counts(db, counts)
                db.commit()
            return written
        except Exception:
            log.exception("model request statistics: adding %d counts failed", len(counts))
            self._put_back(counts)
            return 0

    def _put_back(self, counts: dict[Key, Tally]) -> None:
        with self._lock:
            if len(self._pending) + len(counts) > MAX_PENDING:
                log.error("model request statistics: dropping %d unwritten counts", len(counts))
                return
            for key, tally in counts.items():
                self._pending.setdefault(key, Tally()).add(tally)

    def _write_loop(self) -> None:
        """Flush every ``flush_seconds``. After a flush with nothing to write the thread
        ends (the next call starts another), so an idle process holds no writer."""
        while not self._closing.wait(self.flush_seconds):
            if self.flush():
                continue
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return

    def close(self) -> None:
        """Stop the writer and add what is left (the web process is stopping)."""
        self._closing.set()
        writer = self._writer
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=10)
        self.flush()
