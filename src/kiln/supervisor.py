"""One supervisor for the services `kiln up` runs as separate processes (web, runner, ...).

A service that exits while the supervisor is running is restarted after a back-off that
doubles with each quick crash (1 s up to 30 s) and resets once it has stayed up a minute;
every exit and restart is logged. SIGTERM or SIGINT stops every service with SIGTERM, then
SIGKILL after a grace period. The services' own children are theirs to manage: the runner,
for one, leaves workloads running across its restarts on purpose.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("kiln.supervisor")

MIN_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 30.0, 60.0


@dataclass
class ServiceSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None


@dataclass
class _Running:
    spec: ServiceSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = MIN_BACKOFF
    restart_at: float | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)


def next_backoff(previous: float, uptime: float) -> float:
    """The wait before the next restart: doubled after a quick crash, reset after a stable run."""
    if uptime >= STABLE_AFTER:
        return MIN_BACKOFF
    return min(previous * 2, MAX_BACKOFF)


class Supervisor:
    def __init__(self, services: Sequence[ServiceSpec], grace: float = 10.0) -> None:
        self.services = [_Running(s) for s in services]
        self.grace = grace
        # A plain flag, not a threading.Event: a signal handler that takes a lock the
        # interrupted main thread already holds (Event.wait does) deadlocks.
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def pids(self) -> dict[str, int]:
        return {s.spec.name: s.proc.pid for s in self.services if s.proc and s.proc.poll() is None}

    def restarts(self) -> dict[str, int]:
        return {s.spec.name: s.restarts for s in self.services}

    def _spawn(self, svc: _Running) -> None:
        env = dict(os.environ, **(svc.spec.env or {}))
        svc.proc = subprocess.Popen(list(svc.spec.argv), env=env)
        svc.started_at = time.monotonic()
        svc.restart_at = None
        log.info("started %s (pid %d)", svc.spec.name, svc.proc.pid)

    def run(self, install_signals: bool = True) -> None:
        """Run until stop() or a SIGTERM/SIGINT; then stop every service."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        for svc in self.services:
            self._spawn(svc)
        try:
            while not self._stopping:
                self._check(time.monotonic())
                time.sleep(0.2)
        finally:
            self._shutdown()

    def _check(self, now: float) -> None:
        for svc in self.services:
            if svc.proc is not None and svc.restart_at is None:
                code = svc.proc.poll()
                if code is None:
                    continue
                uptime = now - svc.started_at
                svc.exits.append(code)
                svc.backoff = next_backoff(svc.backoff, uptime) if svc.restarts else MIN_BACKOFF
                svc.restart_at = now + svc.backoff
                log.warning(
                    "service %s exited with code %d after %.1fs; restarting in %.0fs",
                    svc.spec.name,
                    code,
                    uptime,
                    svc.backoff,
                )
            elif svc.restart_at is not None and now >= svc.restart_at:
                svc.restarts += 1
                log.warning("restarting %s (restart #%d)", svc.spec.name, svc.restarts)
                self._spawn(svc)

    def _shutdown(self) -> None:
        live = [s.proc for s in self.services if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + self.grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop in %.0fs; killing it", proc.pid, self.grace)
                proc.kill()
                proc.wait()
        log.info("all services stopped")
