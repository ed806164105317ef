"""The login throttle on its own: delays grow with failures, success resets, memory is bounded."""

from __future__ import annotations

import time

from kiln.domain.identity import LoginThrottle


def test_delays_start_after_the_free_attempts_and_double() -> None:
    throttle = LoginThrottle(free=2, cap_seconds=300)
    keys = ("user:alice", "addr:10.0.0.1")
    throttle.failed(*keys)
    throttle.failed(*keys)
    assert throttle.retry_after("user:alice") > 0.9  # 2**0 seconds after the 2nd failure
    throttle.failed(*keys)
    assert 1.9 < throttle.retry_after("addr:10.0.0.1") <= 2.0
    assert throttle.retry_after("user:bob", "addr:10.0.0.2") == 0
    # Either key alone is enough to wait: a new address does not help against one user.
    assert throttle.retry_after("user:alice", "addr:10.9.9.9") > 1.9
    throttle.succeeded(*keys)
    assert throttle.retry_after(*keys) == 0


def test_delays_are_capped() -> None:
    throttle = LoginThrottle(free=0, cap_seconds=5)
    for _ in range(40):
        throttle.failed("user:alice")
    assert throttle.retry_after("user:alice") <= 5


def test_memory_stays_bounded_under_made_up_names() -> None:
    throttle = LoginThrottle(free=3, cap_seconds=0.05, max_tracked=100)
    for i in range(100):
        throttle.failed(f"user:guess-{i}")
    time.sleep(0.1)  # every delay has run out
    throttle.failed("user:one-more")
    assert len(throttle._failures) == 1
