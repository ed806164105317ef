"""Choosing a replica for each call of one model (asyncio, in the router's event loop).

A replica takes up to ``capacity`` calls at once (the model's concurrency: threads times
processes); the router sends a call to the ready replica with the fewest calls in flight
(among equals, the one that served fewest). When every replica is at capacity, calls wait
in arrival order, each up to its own deadline (``KILN_MODELS_QUEUE_SECONDS``), and then get
``Busy`` (the router's 503 with ``Retry-After``). A replica the router could not reach is set
aside for ``ASIDE_SECONDS``; a replica no longer in the table (drained, stopped) gets no new
calls, while calls already on it finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

ASIDE_SECONDS = 5.0


class Busy(Exception):
    """Every replica stayed at capacity (or there was none) until the deadline."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


@dataclass(eq=False)
class Replica:
    replica_id: str
    endpoint: str  # host:port
    capacity: int
    inflight: int = 0
    usable: bool = True  # named by the routing table
    served: int = field(default=0)
    aside_until: float = 0.0  # could not be reached: no calls before then

    @property
    def free(self) -> bool:
        return (
            self.usable and self.inflight < self.capacity and self.aside_until <= time.monotonic()
        )


class Balancer:
    """The replicas of one model and the calls waiting for one of them."""

    def __init__(self) -> None:
        self._replicas: dict[str, Replica] = {}
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.done())

    def update(self, ready: list[tuple[str, str]], capacity: int) -> None:
        """The routing table's ready replicas, as (replica id, endpoint): new ones join,
        missing ones get no new calls (their calls in flight finish)."""
        names = {replica_id for replica_id, _ in ready}
        for replica_id, endpoint in ready:
            known = self._replicas.get(replica_id)
            if known is None or known.endpoint != endpoint:
                self._replicas[replica_id] = Replica(replica_id, endpoint, capacity)
            else:
                known.capacity = capacity
                known.usable = True  # (a set-aside replica stays aside until its time)
        for replica_id, replica in list(self._replicas.items()):
            if replica_id not in names:
                replica.usable = False
                if replica.inflight == 0:
                    del self._replicas[replica_id]
        self._wake()

    def _pick(self, avoid: Replica | None) -> Replica | None:
        best: Replica | None = None
        for replica in self._replicas.values():
            if (avoid is not None and replica.replica_id == avoid.replica_id) or not replica.free:
                continue
            # Fewest in flight; among equals the one that served fewest, so that calls
            # one after another take turns (and every replica stays warm).
            if best is None or (replica.inflight, replica.served) < (best.inflight, best.served):
                best = replica
        return best

    async def acquire(self, deadline: float, avoid: Replica | None = None) -> Replica:
        """A replica with room for one more call (counted as in flight until ``release``),
        waiting until ``deadline`` (``time.monotonic``) when all are busy; ``Busy`` then.
        ``avoid``: a replica that just failed this call (the retry goes elsewhere)."""
        loop = asyncio.get_running_loop()
        while True:
            # Calls already waiting go first: a newcomer takes a free slot only when nobody
            # waits, so the queue is served in order.
            replica = self._pick(avoid) if not self.waiting else None
            if replica is not None:
                replica.inflight += 1
                replica.served += 1
                return replica
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._busy()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), remaining)
            except TimeoutError:
                raise self._busy() from None
            finally:
                if not waiter.done():
                    waiter.cancel()
                self._discard(waiter)
            replica = self._pick(avoid)
            if replica is not None:
                replica.inflight += 1
                replica.served += 1
                self._wake()  # a slot may be left for the next waiter
                return replica
            self._wake()  # the slot was not for this call (``avoid``): pass the turn on

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already taken off
            self._waiting.remove(waiter)

    def _busy(self) -> Busy:
        usable = [
            r for r in self._replicas.values() if r.usable and r.aside_until <= time.monotonic()
        ]
        if not usable:
            return Busy("the model has no ready replica", retry_after=5)
        return Busy(
            f"all {len(usable)} replicas of the model are busy; try again shortly",
            retry_after=1,
        )

    def release(self, replica: Replica) -> None:
        replica.inflight -= 1
        gone = not replica.usable and replica.inflight == 0
        if gone and self._replicas.get(replica.replica_id) is replica:
            del self._replicas[replica.replica_id]
        self._wake()

    def set_aside(self, replica: Replica) -> None:
        """The replica refused the connection or closed it unanswered: no calls for
        ``ASIDE_SECONDS`` (the routing table may still call it ready until the runner has
        seen it die), then it is tried again."""
        replica.aside_until = time.monotonic() + ASIDE_SECONDS

    def _wake(self) -> None:
        """Let the first waiter try again when a replica has room."""
        if not any(r.free for r in self._replicas.values()):
            return
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)
                return
