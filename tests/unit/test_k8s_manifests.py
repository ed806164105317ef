"""The kubernetes runtime's pure builders: names and manifests, without a cluster."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kiln.runtimes.base import Placement, WorkloadSpec
from kiln.runtimes.kubernetes import manifests, names, podstatus
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, PodInput, Quota, Tenant, Toleration

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
POLICY = ClusterPolicy(
    node_selector={"kiln.dev/pool": "compute"},
    tolerations=(Toleration("kiln.dev/pool", "compute"),),
    host_path="/srv/kiln/projects",
    cluster_cidrs=("10.96.0.0/12",),
)


def spec(**kwargs: object) -> WorkloadSpec:
    fields: dict[str, object] = {
        "id": "session-abc",
        "project_dir": Path("/srv/kiln/projects/7"),
        "command": ("sleep", "infinity"),
    }
    fields.update(kwargs)
    return WorkloadSpec(**fields)  # type: ignore[arg-type]


def work(**kwargs: object) -> PodInput:
    return PodInput(spec(**kwargs), Tenant("user", "Alice.Smith"), 7, "registry:5000/rt@sha256:ab")


# ----------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["alice", "Alice", "alice.smith", "ALICE_SMITH", "a" * 63, "a" * 200, "-x-", "ä", "x..y",
     "bob-h0123456789ab", "1"],
)  # fmt: skip
def test_every_username_becomes_a_valid_namespace(name: str) -> None:
    namespace = names.user_namespace(name)
    assert DNS_LABEL.match(namespace) and len(namespace) <= 63
    assert namespace.startswith("kiln-u-")


def test_plain_names_are_kept_and_others_get_a_hash() -> None:
    assert names.user_namespace("alice") == "kiln-u-alice"
    assert names.team_namespace("ml-team") == "kiln-t-ml-team"
    assert re.fullmatch(r"kiln-u-alice-smith-h[0-9a-f]{12}", names.user_namespace("Alice.Smith"))


def test_names_that_sanitize_alike_do_not_collide() -> None:
    variants = ["alice.smith", "Alice.Smith", "alice_smith", "alice-smith", "ALICE SMITH",
                "alice..smith", "a" * 70, "a" * 71, "a" * 56, "a" * 57]  # fmt: skip
    made = [names.user_namespace(v) for v in variants]
    assert len(set(made)) == len(made)


def test_a_name_cannot_impersonate_another_names_hashed_form() -> None:
    hashed = names.user_namespace("Alice")  # kiln-u-alice-h<hash>
    chosen = hashed.removeprefix("kiln-u-")  # somebody registers that very string
    assert names.user_namespace(chosen) != hashed


def test_users_and_teams_never_share_a_namespace() -> None:
    assert names.user_namespace("ml") != names.team_namespace("ml")


@given(st.lists(st.text(min_size=1, max_size=90), min_size=2, max_size=6, unique=True))
def test_names_are_valid_and_collision_free(texts: list[str]) -> None:
    made = [names.user_namespace(t) for t in texts]
    assert all(DNS_LABEL.match(m) and len(m) <= 63 for m in made)
    assert len(set(made)) == len(made)


def test_pod_service_and_claim_names() -> None:
    assert names.pod_name("session-abc") == "w-session-abc"
    assert DNS_LABEL.match(names.pod_name("Run_7.2"))
    assert names.project_claim(7) == "project-7"
    assert names.project_volume("kiln-u-alice", 7) == "kiln-u-alice-project-7"
    with pytest.raises(ValueError):
        names.project_claim(0)


# ----------------------------------------------------------------- namespaces


def test_namespace_is_restricted_in_every_mode() -> None:
    ns = manifests.namespace(Tenant("user", "Alice.Smith"))
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert labels["app.kubernetes.io/managed-by"] == "kiln"
    assert ns["metadata"]["annotations"] == {"kiln.dev/user": "Alice.Smith"}


def test_network_policies_deny_by_default_and_allow_only_kiln() -> None:
    deny, from_web, egress = manifests.network_policies("kiln-u-alice", POLICY)
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    (rule,) = from_web["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kiln"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "web"}
    dns, api, outside = egress["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert api["ports"] == [{"protocol": "TCP", "port": 8443}]
    block = outside["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    assert set(block["except"]) == {"169.254.0.0/16", "10.96.0.0/12"}


def test_without_egress_only_dns_and_the_kiln_api_are_reachable() -> None:
    policy = ClusterPolicy(egress=False, host_path="/x")
    egress = manifests.network_policies("ns", policy)[2]["spec"]["egress"]
    assert len(egress) == 2 and all("ipBlock" not in str(rule) for rule in egress)


def test_quota_and_limit_range_follow_the_user_quota() -> None:
    quota = Quota(cpu_millis=2000, memory_bytes=8 * 1024**3)
    hard = manifests.resource_quota("ns", quota)["spec"]["hard"]
    assert hard["limits.cpu"] == "2000m" and hard["requests.memory"] == str(8 * 1024**3)
    assert hard["requests.nvidia.com/gpu"] == "0"
    (limits,) = manifests.limit_range("ns", quota)["spec"]["limits"]
    assert limits["max"] == {"cpu": "2000m", "memory": str(8 * 1024**3)}
    assert limits["default"] == {"cpu": "1000m", "memory": str(2 * 1024**3)}


# ----------------------------------------------------------------- project volumes


def test_project_volume_is_prebound_to_its_namespace_claim() -> None:
    pv = manifests.project_volume(POLICY, "kiln-u-alice", 7)
    pvc = manifests.project_claim(POLICY, "kiln-u-alice", 7)
    assert pv["spec"]["claimRef"] == {"namespace": "kiln-u-alice", "name": "project-7"}
    assert pv["spec"]["hostPath"] == {"path": "/srv/kiln/projects/7", "type": "Directory"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"]
    pinned = manifests.project_volume(POLICY, "kiln-u-alice", 7, claim_uid="uid-1")
    assert pinned["spec"]["claimRef"]["uid"] == "uid-1"  # that very claim object
    assert pvc["metadata"]["namespace"] == "kiln-u-alice"


def test_nfs_volume_points_at_the_projects_directory_on_the_export() -> None:
    policy = ClusterPolicy(nfs_server="nfs.example", nfs_path="/exports/kiln/")
    pv = manifests.project_volume(policy, "kiln-t-ml", 12)
    assert pv["spec"]["nfs"] == {"server": "nfs.example", "path": "/exports/kiln/12"}
    assert pv["spec"]["mountOptions"] == ["nosuid", "nodev"]


def test_a_volume_needs_somewhere_to_point() -> None:
    with pytest.raises(ValueError, match="NFS"):
        manifests.project_volume(ClusterPolicy(), "ns", 1)


# ----------------------------------------------------------------- pods


def test_pod_is_restricted_non_root_and_has_no_token() -> None:
    pod = manifests.pod(POLICY, work(cpu=1.5, memory_bytes=3 * 1024**3, port=8888))
    body = pod["spec"]
    (container,) = body["containers"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 8536
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]} and not security["privileged"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert body["automountServiceAccountToken"] is False
    assert not body["hostNetwork"] and not body["hostPID"] and not body["hostIPC"]
    assert all("hostPath" not in v for v in body["volumes"])  # only the PVC and a tmpfs
    assert container["resources"]["requests"] == {"cpu": "1500m", "memory": str(3 * 1024**3)}
    assert container["resources"]["limits"] == container["resources"]["requests"]
    assert body["nodeSelector"] == {"kiln.dev/pool": "compute"}
    assert body["tolerations"] == [
        {"key": "kiln.dev/pool", "operator": "Equal", "value": "compute", "effect": "NoSchedule"}
    ]
    assert body["imagePullSecrets"] == [{"name": "kiln-registry"}]
    assert body["priorityClassName"] == "kiln-workload"
    assert container["ports"] == [{"name": "workload", "containerPort": 8888}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/home/cdsw": "project", "/tmp": "tmp"}
    claim = next(v for v in body["volumes"] if v["name"] == "project")
    assert claim["persistentVolumeClaim"] == {"claimName": "project-7"}
    assert pod["metadata"]["finalizers"] == ["kiln.dev/keep-until-read"]
    assert pod["metadata"]["namespace"] == names.user_namespace("Alice.Smith")


def test_a_model_replica_runs_its_images_home_without_the_project_volume() -> None:
    image = "registry:5000/models/alice/demo@sha256:" + "c" * 64
    replica = spec(
        id="model-r1",
        command=("python3", "-m", "kiln.serving.model_server"),
        port=8080,
        project_mount=False,
        placement=Placement("user", "Alice.Smith", 7, "model-replica", image),
    )
    pod = manifests.pod(POLICY, PodInput(replica, Tenant("user", "Alice.Smith"), 7, image))
    body = pod["spec"]
    (container,) = body["containers"]
    assert container["image"] == image
    # The built code is the image's own /home/cdsw: no claim, nothing mounted over it.
    assert [v["name"] for v in body["volumes"]] == ["tmp"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert container["securityContext"]["readOnlyRootFilesystem"]


def test_a_workload_on_its_images_home_needs_an_image() -> None:
    with pytest.raises(ValueError, match="needs an image"):
        spec(project_mount=False).check()
    pulled = Placement("user", "alice", 7, "model-replica", "registry:5000/m@sha256:" + "a" * 64)
    spec(project_mount=False, placement=pulled).check()  # the cluster pulls it: fine


def test_sized_scratch_directories_are_memory_backed_and_hide_what_they_cover() -> None:
    pod = manifests.pod(
        POLICY, work(tmpfs=(("/opt/kiln/deps", 64 * 1024**2), ("/home/cdsw", 8 * 1024**2)))
    )
    body = pod["spec"]
    (container,) = body["containers"]
    volumes = {v["name"]: v for v in body["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    # A tmpfs at /home/cdsw replaces the project's claim (as the local runtime's does).
    assert "project" not in volumes and mounts["/home/cdsw"] == "scratch-1"
    assert volumes[mounts["/opt/kiln/deps"]]["emptyDir"] == {
        "medium": "Memory",
        "sizeLimit": str(64 * 1024**2),
    }
    assert mounts["/tmp"] == "tmp"  # the default /tmp stays...
    replaced = manifests.pod(POLICY, work(tmpfs=(("/tmp", 32 * 1024**2),)))
    (container,) = replaced["spec"]["containers"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/home/cdsw", "/tmp"]
    assert [v["name"] for v in replaced["spec"]["volumes"]] == ["project", "scratch-0"]


def test_read_only_files_travel_as_an_immutable_config_map_named_by_content() -> None:
    files = [("ca-bundle.crt", b"PEM"), ("python/kiln/sdk/workers.py", b"print(1)\n")]
    manifest, mount = manifests.files_config_map("kiln-u-alice", files, "/run/kiln")
    again, _ = manifests.files_config_map("kiln-u-alice", list(reversed(files)), "/run/kiln")
    changed, _ = manifests.files_config_map("kiln-u-alice", [("ca-bundle.crt", b"NEW")], "/x")
    assert manifest == again and changed["metadata"]["name"] != manifest["metadata"]["name"]
    assert manifest["immutable"] is True
    assert DNS_LABEL.match(manifest["metadata"]["name"])
    by_path = {path: key for key, path in mount.items}
    assert manifest["binaryData"][by_path["python/kiln/sdk/workers.py"]] == "cHJpbnQoMSkK"
    pod = manifests.pod(POLICY, replace(work(), files=(mount,)))
    (container,) = pod["spec"]["containers"]
    (volume,) = [v for v in pod["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == manifest["metadata"]["name"]
    assert volume["configMap"]["defaultMode"] == 0o444
    assert {"key": by_path["ca-bundle.crt"], "path": "ca-bundle.crt"} in volume["configMap"][
        "items"
    ]
    assert {"name": volume["name"], "mountPath": "/run/kiln", "readOnly": True} in container[
        "volumeMounts"
    ]
    with pytest.raises(ValueError, match="at most"):
        manifests.files_config_map("ns", [("big", b"x" * (manifests.FILES_MAX_BYTES + 1))], "/x")


def test_pod_environment_defaults_lose_to_the_callers() -> None:
    pod = manifests.pod(POLICY, work(env={"HOME": "/elsewhere", "CDSW_PROJECT": "demo"}))
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["HOME"] == "/elsewhere" and env["CDSW_PROJECT"] == "demo"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PIP_CACHE_DIR"] == "/tmp/.cache/pip"


def test_an_invalid_spec_builds_no_pod() -> None:
    with pytest.raises(ValueError):
        manifests.pod(POLICY, work(id="../escape"))


def test_service_only_for_a_declared_port() -> None:
    assert manifests.service(work()) is None
    svc = manifests.service(work(port=8080))
    assert svc is not None
    assert svc["spec"]["ports"] == [{"name": "workload", "port": 8080, "targetPort": 8080}]
    assert svc["spec"]["selector"] == {"kiln.dev/workload": "session-abc"}


def test_a_sessions_web_ui_ports_are_declared_and_served_too() -> None:
    session = work(port=8888, extra_ports=(8100, 8101))
    svc = manifests.service(session)
    assert svc is not None
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("workload", 8888, 8888), ("port-8100", 8100, 8100), ("port-8101", 8101, 8101),
    ]  # fmt: skip
    container = manifests.pod(POLICY, session)["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [8888, 8100, 8101]
    # A terminal session has no editor port, only the web UI ones: still a Service.
    terminal = manifests.service(work(extra_ports=(8100,)))
    assert terminal is not None and terminal["spec"]["ports"][0]["name"] == "port-8100"


def test_label_values_of_odd_ids_are_valid_and_distinct() -> None:
    ids = ["a_b", "a.b", "A-B", "x" * 64, "x" * 63 + "y"]
    values = [names.label_value(i) for i in ids]
    assert len(set(values)) == len(values)
    assert all(len(v) <= 63 for v in values)


# ----------------------------------------------------------------- pod status


def _pod(**status: object) -> dict[str, object]:
    return {"spec": {"nodeName": "n1"}, "status": status}


def test_unschedulable_fails_at_once_with_the_schedulers_words() -> None:
    pod = _pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient cpu.",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ]
    )
    failure = podstatus.start_failure(pod)
    assert failure is not None and failure.kind == "unschedulable"
    assert "3 Insufficient cpu" in failure.message
    assert podstatus.start_failure(pod, autoscaling=True) is None  # a node may come
    pod["status"]["nominatedNodeName"] = "n2"  # type: ignore[index]
    assert podstatus.start_failure(pod) is None  # preempting placeholders to make room


def test_image_pull_errors_and_crash_loops_are_classified() -> None:
    for reason, kind in (
        ("ErrImagePull", "image"),
        ("ImagePullBackOff", "image"),
        ("CrashLoopBackOff", "crash-loop"),
        ("CreateContainerConfigError", "config"),
    ):
        pod = _pod(
            containerStatuses=[
                {"image": "r/x:1", "state": {"waiting": {"reason": reason, "message": "m"}}}
            ]
        )
        failure = podstatus.start_failure(pod)
        assert failure is not None and failure.kind == kind
    assert podstatus.quota_failure("pods is forbidden: exceeded quota: kiln-quota") is not None
    assert podstatus.quota_failure("some other refusal") is None


def test_endings_map_to_kiln_reasons() -> None:
    def terminated(code: int, reason: str) -> dict[str, object]:
        return _pod(containerStatuses=[{"state": {"terminated": {"exitCode": code,
                                                                 "reason": reason}}}])  # fmt: skip

    oom = podstatus.ending(terminated(137, "OOMKilled"))
    assert oom is not None and oom.reason.value == "oom" and oom.exit_code == 137
    done = podstatus.ending(terminated(0, "Completed"))
    assert done is not None and done.reason.value == "exited" and done.message == ""
    assert podstatus.ending(_pod(phase="Running")) is None
    evicted = podstatus.ending(_pod(phase="Failed", message="The node was low on memory."))
    assert evicted is not None and evicted.reason.value == "lost"
    assert "low on memory" in evicted.message


def test_steps_are_kubernetes_own_in_order() -> None:
    pod = _pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "True",
                "lastTransitionTime": "2026-01-01T00:00:01Z",
            },
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:04Z"},
        ],
        containerStatuses=[{"state": {"running": {"startedAt": "2026-01-01T00:00:03Z"}}}],
    )
    events = [{"reason": "Pulled", "type": "Normal", "lastTimestamp": "2026-01-01T00:00:02Z"}]
    texts = [text for _, text in podstatus.steps(pod, events)]
    assert texts == ["scheduled on node n1", "image pulled", "container started", "ready"]


def test_every_builder_output_is_json_serialisable() -> None:
    import json

    quota = Quota(1000, 1024**3)
    tenant = Tenant("team", "ML Team")
    objects = [
        *manifests.namespace_objects(tenant, POLICY, quota),
        manifests.pull_secret("ns", "registry:5000", "u", "p"),
        manifests.pod(POLICY, work()),
        manifests.runner_binding("ns", "kiln-runner-tenant", "kiln", "kiln-runner"),
    ]
    for obj in objects:
        json.dumps(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kiln"
    pairs = itertools.combinations([o["metadata"]["name"] for o in objects[1:5]], 2)
    assert all(a != b for a, b in pairs)  # the four NetworkPolicy/... names differ
