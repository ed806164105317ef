"""The model router's choice of replica: least calls in flight, capacity per replica, a
queue served in order up to a deadline, set-aside replicas and drained ones."""

from __future__ import annotations

import asyncio
import time

import pytest

from kiln.serving.balancer import Balancer, Busy


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_least_inflight_and_capacity() -> None:
    async def main() -> None:
        b = Balancer()
        b.update([("r1", "127.0.0.1:1"), ("r2", "127.0.0.1:2")], capacity=2)
        deadline = time.monotonic() + 1
        got = [await b.acquire(deadline) for _ in range(4)]
        assert sorted(r.replica_id for r in got) == ["r1", "r1", "r2", "r2"]
        assert [r.replica_id for r in got[:2]] in (["r1", "r2"], ["r2", "r1"])
        with pytest.raises(Busy) as busy:
            await b.acquire(time.monotonic() + 0.05)
        assert busy.value.retry_after == 1 and "all 2 replicas" in busy.value.detail
        b.release(got[0])
        assert (await b.acquire(time.monotonic() + 0.05)) is got[0]

    run(main())


def test_waiting_calls_are_served_in_order() -> None:
    async def main() -> None:
        b = Balancer()
        b.update([("r1", "e1")], capacity=1)
        first = await b.acquire(time.monotonic() + 1)
        order: list[int] = []

        async def call(n: int) -> None:
            replica = await b.acquire(time.monotonic() + 2)
            order.append(n)
            await asyncio.sleep(0.01)
            b.release(replica)

        tasks = [asyncio.create_task(call(n)) for n in range(5)]
        await asyncio.sleep(0.05)
        assert b.waiting == 5
        b.release(first)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4] and b.waiting == 0

    run(main())


def test_a_call_waits_for_a_replica_that_becomes_ready() -> None:
    async def main() -> None:
        b = Balancer()
        waiter = asyncio.create_task(b.acquire(time.monotonic() + 2))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        b.update([("r1", "e1")], capacity=1)
        assert (await waiter).replica_id == "r1"
        with pytest.raises(Busy) as busy:
            await Balancer().acquire(time.monotonic() + 0.01)
        assert "no ready replica" in busy.value.detail and busy.value.retry_after == 5

    run(main())


def test_set_aside_and_drained_replicas_get_no_new_calls() -> None:
    async def main() -> None:
        b = Balancer()
        b.update([("r1", "e1"), ("r2", "e2")], capacity=4)
        r1 = await b.acquire(time.monotonic() + 1)
        b.set_aside(r1)
        other = "r2" if r1.replica_id == "r1" else "r1"
        others = {(await b.acquire(time.monotonic() + 1)).replica_id for _ in range(3)}
        assert others == {other}
        # Set aside even though the routing table still names it; the retry of a failed
        # call avoids the replica it failed on whatever happens.
        b.update([("r1", "e1"), ("r2", "e2")], capacity=8)
        assert (await b.acquire(time.monotonic() + 1)).replica_id == other
        r1.aside_until = 0.0
        retried = await b.acquire(time.monotonic() + 1, avoid=r1)
        assert retried.replica_id == other
        # Drained: gone from the table; its call in flight finishes, then it is forgotten.
        b.update([("r3", "e3")], capacity=4)
        assert {r.replica_id for r in b.replicas if r.usable} == {"r3"}
        assert (await b.acquire(time.monotonic() + 1)).replica_id == "r3"
        b.release(r1)
        assert "r1" not in {r.replica_id for r in b.replicas}

    run(main())


def test_a_new_endpoint_for_the_same_replica_is_a_new_replica() -> None:
    async def main() -> None:
        b = Balancer()
        b.update([("r1", "e1")], capacity=1)
        old = await b.acquire(time.monotonic() + 1)
        b.update([("r1", "e9")], capacity=1)  # restarted elsewhere
        new = await b.acquire(time.monotonic() + 1)
        assert new.endpoint == "e9" and new is not old

    run(main())
