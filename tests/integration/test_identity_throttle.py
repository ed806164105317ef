"""The login throttle on its own (in the database, on SQLite and PostgreSQL): delays grow
with failures, success resets, old rows are pruned, and web replicas share one count."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from kiln.app import create_app
from kiln.db.engine import make_sessionmaker
from kiln.db.models import LoginFailure
from kiln.domain.identity import LoginThrottle
from kiln.settings import Settings
from tests.conftest import Account


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_delays_start_after_the_free_attempts_and_double(engine: Engine) -> None:
    clock = Clock()
    throttle = LoginThrottle(make_sessionmaker(engine), free=2, cap_seconds=300, clock=clock)
    keys = ("user:alice", "addr:10.0.0.1")
    throttle.failed(*keys)
    throttle.failed(*keys)
    assert throttle.retry_after("user:alice") == 1.0  # 2**0 seconds after the 2nd failure
    throttle.failed(*keys)
    clock.now += 0.5
    assert throttle.retry_after("addr:10.0.0.1") == 1.5
    assert throttle.retry_after("user:bob", "addr:10.0.0.2") == 0
    # Either key alone is enough to wait: a new address does not help against one user.
    assert throttle.retry_after("user:alice", "addr:10.9.9.9") == 1.5
    throttle.succeeded(*keys)
    assert throttle.retry_after(*keys) == 0


def test_delays_are_capped(engine: Engine) -> None:
    throttle = LoginThrottle(make_sessionmaker(engine), free=0, cap_seconds=5, clock=Clock())
    for _ in range(40):
        throttle.failed("user:alice")
    assert throttle.retry_after("user:alice") == 5


def test_old_failures_are_pruned_so_made_up_names_cannot_grow_the_table(engine: Engine) -> None:
    clock = Clock()
    throttle = LoginThrottle(make_sessionmaker(engine), free=3, clock=clock)
    for i in range(100):
        throttle.failed(f"user:guess-{i}")
    clock.now += LoginThrottle.PRUNE_AFTER + 1
    throttle.failed("user:one-more")
    with make_sessionmaker(engine)() as db:
        assert db.scalar(select(func.count()).select_from(LoginFailure)) == 1


def test_two_web_replicas_share_the_throttle(
    settings: Settings, engine: Engine, alice: Account
) -> None:
    """Failures on one replica slow logins on another: guessing cannot be spread out."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    first, second = create_app(settings, engine), create_app(settings, engine)
    bad = {"username": alice.username, "password": "wrong-wrong"}
    with (
        TestClient(first, base_url="https://testserver") as one,
        TestClient(second, base_url="https://testserver") as two,
    ):
        for client in (one, two, one):
            assert client.post("/api/v1/auth/login", json=bad).status_code == 401
        good = {"username": alice.username, "password": alice.password}
        refused = two.post("/api/v1/auth/login", json=good)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
