"""The runner's project-storage provisioner (``kubesite.provision_pass``) against a real API
server and a real database: a project's claim exists, Bound, in each namespace that may run
its workloads before any session starts, and goes when that stops being true.

One runtime and one pass after another (the thread calls the same function every few
seconds). Usernames and team names are unique per test: the control plane is shared by the
whole test session, and the provisioner only ever touches namespaces of Kiln's own users.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from kiln.db.engine import make_sessionmaker, transaction
from kiln.db.models import Project, Role
from kiln.domain.identity import create_team, get_user
from kiln.domain.projects import new_project, remove_collaborator, set_collaborator
from kiln.runner import kubesite
from kiln.runtimes.base import Placement, WorkloadSpec
from kiln.runtimes.kubernetes import KubernetesRuntime, names
from kiln.runtimes.kubernetes.client import Kube, KubeError
from tests.integration.test_runtime_kubernetes import close_runtimes, make_runtime

pytestmark = pytest.mark.slow


@pytest.fixture
def admin(kube_cluster: Any) -> Iterator[Kube]:
    kube = Kube.from_kubeconfig(str(kube_cluster.kubeconfig))
    yield kube
    kube.close()


@pytest.fixture
def new_runtime(kube_cluster: Any, tmp_path: Path) -> Iterator[Callable[[], KubernetesRuntime]]:
    made: list[KubernetesRuntime] = []

    def make() -> KubernetesRuntime:
        runtime = make_runtime(
            kube_cluster, tmp_path / f"state-{len(made)}", tmp_path / "projects"
        )()
        made.append(runtime)
        return runtime

    yield make
    close_runtimes(made)


def claim_phase(admin: Kube, namespace: str, project_id: int) -> str | None:
    try:
        claim = admin.get("PersistentVolumeClaim", names.project_claim(project_id), namespace)
    except KubeError as exc:
        assert exc.status == 404
        return None
    if claim["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return str((claim.get("status") or {}).get("phase") or "")


def wait_gone(admin: Kube, namespace: str, project_id: int) -> None:
    deadline = time.monotonic() + 20
    while claim_phase(admin, namespace, project_id) is not None:
        assert time.monotonic() < deadline, f"{namespace}/project-{project_id} is still there"
        time.sleep(0.2)
    volume = names.project_volume(namespace, project_id)
    while True:
        try:
            admin.get("PersistentVolume", volume)
        except KubeError as exc:
            assert exc.status == 404
            return
        assert time.monotonic() < deadline, f"volume {volume} is still there"
        time.sleep(0.2)


def session(tmp_path: Path, user: str, project_id: int, name: str) -> WorkloadSpec:
    directory = tmp_path / "projects" / str(project_id)
    directory.mkdir(parents=True, exist_ok=True)
    return WorkloadSpec(
        id=f"{name}-{uuid.uuid4().hex[:6]}",
        project_dir=directory,
        command=("jupyter", "lab"),
        cpu=0.25,
        memory_bytes=256 * 1024**2,
        placement=Placement("user", user, project_id, "session"),
    )


def test_claims_follow_who_may_work_in_a_project(
    engine: Engine,
    make_user: Callable[..., Any],
    admin: Kube,
    new_runtime: Callable[[], KubernetesRuntime],
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:6]
    ann, bob, cy = (f"{who}-{tag}" for who in ("ann", "bob", "cy"))
    for username in (ann, bob, cy):
        make_user(username)
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as db:
        owner = get_user(db, ann)
        personal = new_project(db, owner, "Churn model").id
        team = create_team(db, f"data-{tag}", owner)
        shared = new_project(db, owner, "Shared", owner=team.name).id
        set_collaborator(db, db.get(Project, personal), cy, Role.viewer)  # type: ignore[arg-type]
    ann_ns, bob_ns, cy_ns = (names.user_namespace(u) for u in (ann, bob, cy))
    team_ns = names.team_namespace(f"data-{tag}")
    root = tmp_path / "projects"
    runtime = new_runtime()

    # Created: the owner's claim, Bound, before any session; the team project's in the
    # team's namespace; none for a viewer (who may not start workloads).
    provisioned, deleted = kubesite.provision_pass(runtime, sessions, root)
    assert set(provisioned) == {f"{ann_ns}/project-{personal}", f"{team_ns}/project-{shared}"}
    assert deleted == []
    assert claim_phase(admin, ann_ns, personal) == "Bound"
    assert claim_phase(admin, team_ns, shared) == "Bound"
    assert claim_phase(admin, cy_ns, personal) is None

    # Nothing to do: a pass sends no request.
    before = runtime.kube.requests
    assert kubesite.provision_pass(runtime, sessions, root) == ([], [])
    assert runtime.kube.requests == before

    # The first session then sends its pod alone (no namespace, claim or volume request).
    before = runtime.kube.requests
    first = session(tmp_path, ann, personal, "first")
    runtime.start(first)
    assert runtime.kube.requests - before == 1

    # A collaborator added (operator: may start jobs) gets a claim in their namespace.
    with transaction(sessions) as db:
        set_collaborator(db, db.get(Project, personal), bob, Role.operator)  # type: ignore[arg-type]
    provisioned, _ = kubesite.provision_pass(runtime, sessions, root)
    assert provisioned == [f"{bob_ns}/project-{personal}"]
    assert claim_phase(admin, bob_ns, personal) == "Bound"

    # After a runner restart, the claims Bound in the cache are recognised: no request.
    restarted = new_runtime()
    before = restarted.kube.requests
    assert kubesite.provision_pass(restarted, sessions, root) == ([], [])
    assert restarted.kube.requests == before
    restarted.ensure_project(ann_ns, personal, root / str(personal))
    assert restarted.kube.requests == before

    # A removed collaborator's claim (and its volume) goes; so does a demoted one's.
    with transaction(sessions) as db:
        remove_collaborator(db, db.get(Project, personal), bob)  # type: ignore[arg-type]
    _, deleted = kubesite.provision_pass(runtime, sessions, root)
    assert deleted == [f"{bob_ns}/project-{personal}"]
    wait_gone(admin, bob_ns, personal)
    assert claim_phase(admin, ann_ns, personal) == "Bound"  # the owner's stays

    # Added back: a new claim. A claim an admin deleted by hand is made again.
    with transaction(sessions) as db:
        set_collaborator(db, db.get(Project, personal), bob, Role.contributor)  # type: ignore[arg-type]
    assert kubesite.provision_pass(runtime, sessions, root)[0] == [f"{bob_ns}/project-{personal}"]
    admin.delete("PersistentVolumeClaim", names.project_claim(personal), bob_ns)
    admin.delete("PersistentVolume", names.project_volume(bob_ns, personal))
    wait_gone(admin, bob_ns, personal)
    runtime.claims.wait_for(lambda: runtime.claims.get(bob_ns, f"project-{personal}") is None, 10)
    assert kubesite.provision_pass(runtime, sessions, root)[0] == [f"{bob_ns}/project-{personal}"]
    assert claim_phase(admin, bob_ns, personal) == "Bound"

    # A deleted project leaves no claim in any namespace.
    with transaction(sessions) as db:
        db.delete(db.get(Project, shared))
        db.delete(db.get(Project, personal))
    _, deleted = kubesite.provision_pass(runtime, sessions, root)
    assert sorted(deleted) == sorted(
        f"{ns}/project-{pid}"
        for ns, pid in ((team_ns, shared), (ann_ns, personal), (bob_ns, personal))
    )
    # The running session holds its claim until it ends (Kubernetes' claim protection).
    assert claim_phase(admin, ann_ns, personal) == "Terminating"
    runtime.stop(first.id, grace=0)
    for ns, pid in ((team_ns, shared), (ann_ns, personal), (bob_ns, personal)):
        wait_gone(admin, ns, pid)


def test_a_session_started_before_the_pass_still_starts(
    engine: Engine,
    make_user: Callable[..., Any],
    admin: Kube,
    new_runtime: Callable[[], KubernetesRuntime],
    tmp_path: Path,
) -> None:
    """The fallback: a project made a moment ago, started before the provisioner saw it,
    gets its claim from ``start`` itself; the next pass then has nothing to do."""
    dee = f"dee-{uuid.uuid4().hex[:6]}"
    make_user(dee)
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as db:
        project = new_project(db, get_user(db, dee), "Fresh").id
    runtime = new_runtime()
    spec = session(tmp_path, dee, project, "early")
    runtime.start(spec)
    assert runtime.status(spec.id).running
    assert claim_phase(admin, names.user_namespace(dee), project) == "Bound"
    before = runtime.kube.requests
    assert kubesite.provision_pass(runtime, sessions, tmp_path / "projects") == ([], [])
    assert runtime.kube.requests == before


def test_a_disabled_account_loses_its_claims(
    engine: Engine,
    make_user: Callable[..., Any],
    admin: Kube,
    new_runtime: Callable[[], KubernetesRuntime],
    tmp_path: Path,
) -> None:
    eve = f"eve-{uuid.uuid4().hex[:6]}"
    make_user(eve)
    sessions = make_sessionmaker(engine)
    with transaction(sessions) as db:
        project = new_project(db, get_user(db, eve), "Soon gone").id
    runtime = new_runtime()
    root = tmp_path / "projects"
    assert kubesite.provision_pass(runtime, sessions, root)[0] == [
        f"{names.user_namespace(eve)}/project-{project}"
    ]
    with transaction(sessions) as db:
        get_user(db, eve).is_active = False
    assert kubesite.provision_pass(runtime, sessions, root)[1] == [
        f"{names.user_namespace(eve)}/project-{project}"
    ]
    wait_gone(admin, names.user_namespace(eve), project)
