"""Shared fixtures. Every DB-touching test runs on SQLite and on PostgreSQL.

PostgreSQL comes from ``KILN_TEST_POSTGRES_URL`` (default: the local server and the role that
``scripts/ensure_postgres.sh`` creates; `make test` runs it). Each
test session creates its own database and drops it at the end. When PostgreSQL is unreachable
its tests are skipped with a notice, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from kiln.app import create_app
from kiln.db.engine import make_engine, make_sessionmaker, transaction
from kiln.db.migrate import upgrade
from kiln.db.models import Base
from kiln.domain import passwords
from kiln.domain.identity import create_api_key, create_user
from kiln.settings import Settings
from kiln.storage.volumes import unmount_below
from kiln.testing.live import LiveServer, live_server

PG_ADMIN_URL = os.environ.get(
    "KILN_TEST_POSTGRES_URL",
    "postgresql+psycopg://kiln_test:kiln_test@127.0.0.1:5432/kiln_test",
)
IN_CI = os.environ.get("CI", "").lower() == "true"
PASSWORD = "correct-horse-battery"


def _postgres_database() -> Iterator[str]:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable: {exc}")
        pytest.skip(f"NOTICE: PostgreSQL unreachable at {PG_ADMIN_URL}; its tests are skipped")
    name = f"kiln_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(autouse=True, scope="session")
def _light_password_hashing() -> Iterator[None]:
    """Argon2id at its lightest cost inside the test process. Every test account costs a hash
    and every password sign-in a verification, about 0.25 s each at the production cost
    (which stays the default, and which `kiln up` sites started by tests still use); the
    stored form stays argon2id (tests/security/test_auth.py checks it)."""
    light = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    original = passwords._hasher, passwords._DUMMY_HASH
    passwords._hasher, passwords._DUMMY_HASH = light, light.hash("unknown-user")
    yield
    passwords._hasher, passwords._DUMMY_HASH = original


@pytest.fixture(autouse=True)
def _unmount_project_filesystems(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Project filesystems (loop mounts) made by a test are unmounted after it, so that its
    temporary directory can be removed and loop devices do not pile up."""
    yield
    if os.geteuid() == 0:
        unmount_below(tmp_path_factory.getbasetemp())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests whose database is incidental (marked ``one_database``, and every ``browser``
    test: the page is the subject) run on SQLite only; what they touch of the database is
    tested on both by the API and domain tests. This keeps the suite inside CI's time."""
    once: list[pytest.Item] = []
    kept: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("db_url") == "postgres"
        incidental = item.get_closest_marker("one_database") or item.get_closest_marker("browser")
        (once if on_postgres and incidental else kept).append(item)
    if once:
        config.hook.pytest_deselected(items=once)
        items[:] = kept


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'kiln.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="session")
def migrated_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Iterator[Engine]:
    """A migrated database, emptied after each test."""
    yield migrated_engine
    with migrated_engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        env="test", data_dir=tmp_path / "data", database_url=db_url, secret_key="x" * 32
    )


@pytest.fixture
def app(settings: Settings, engine: Engine):  # type: ignore[no-untyped-def]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_app(settings, engine)


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, base_url="https://testserver") as c:
        yield c


@dataclass
class Account:
    username: str
    password: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def basic(self) -> dict[str, str]:
        raw = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def make_user(engine: Engine) -> Callable[..., Account]:
    factory = make_sessionmaker(engine)

    def make(username: str, site_admin: bool = False) -> Account:
        with transaction(factory) as db:
            user = create_user(db, username, PASSWORD, site_admin=site_admin)
            _, key = create_api_key(db, user, "test")
        return Account(username, PASSWORD, key)

    return make


@pytest.fixture
def alice(make_user: Callable[..., Account]) -> Account:
    return make_user("alice")


@pytest.fixture
def bob(make_user: Callable[..., Account]) -> Account:
    return make_user("bob")


@pytest.fixture
def admin(make_user: Callable[..., Account]) -> Account:
    return make_user("root-admin", site_admin=True)


@pytest.fixture
def live(settings: Settings, engine: Engine) -> Iterator[LiveServer]:
    """A real HTTPS server (uvicorn, TLS from Kiln's CA) on a free port."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with live_server(settings, engine) as server:
        yield server


# ---- the Kubernetes test control plane (issue 12) ------------------------------------------

COMPUTE_POOL = {"kiln.dev/pool": "compute"}


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """etcd, kube-apiserver (RBAC, TLS), controller manager, scheduler and KWOK, started once
    per test session (kiln.testing.kube), with two fake compute-pool nodes (labelled and
    tainted as Kiln's chart expects) and one system node for Kiln's own services."""
    from kiln.testing.kube import ControlPlane

    plane = ControlPlane.start(tmp_path_factory.mktemp("kube"))
    try:
        plane.add_nodes(
            2,
            prefix="compute",
            labels=COMPUTE_POOL,
            taints=[{"key": "kiln.dev/pool", "value": "compute", "effect": "NoSchedule"}],
        )
        plane.add_nodes(1, prefix="system")
        from kiln.runtimes.kubernetes.client import Kube
        from kiln.runtimes.kubernetes.manifests import priority_classes

        kube = Kube.from_kubeconfig(str(plane.kubeconfig))
        for manifest in priority_classes():  # what the chart installs before any workload
            kube.apply(manifest)
        kube.close()
        yield plane
    finally:
        plane.stop()
