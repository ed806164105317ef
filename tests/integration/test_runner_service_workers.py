"""The runner's side of the Workers API, on real sandboxes: children start only under a
running parent of their project and die with it (also across a runner restart); sessions and
job runs get the way to the web tier (network door, CA bundle, SDK and CML library, URLs)."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from kiln.pki.ca import WORKLOAD_GATEWAY
from kiln.rpc import runner_pb2 as pb
from kiln.runtimes.local.sandbox import SLIRP_GATEWAY
from tests.integration.test_runner_service import (
    S,
    Site,
    site,  # noqa: F401  (fixture)
    spec,
    status_in,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


def start_parent(site: Site, workload_id: str = "parent") -> None:  # noqa: F811
    request = spec(workload_id, "exec sleep 300")
    request.spec.kind = pb.WORKLOAD_KIND_SESSION
    assert site.stub().StartWorkload(request).state == S.WORKLOAD_STATE_RUNNING


def child(workload_id: str, parent: str = "parent", **extra: object) -> pb.StartWorkloadRequest:
    request = spec(workload_id, "exec sleep 300", parent_workload_id=parent, **extra)
    request.spec.kind = pb.WORKLOAD_KIND_WORKER
    return request


def test_the_certificate_names_the_gateway_sandboxes_see() -> None:
    assert WORKLOAD_GATEWAY == SLIRP_GATEWAY


def test_a_child_needs_a_running_parent_of_its_project(site: Site) -> None:  # noqa: F811
    web = site.stub()
    (site.settings.projects_dir / "8").mkdir()
    start_parent(site)
    web.StartWorkload(spec("ended", "true"))
    wait_for(lambda: status_in(web, "ended", S.WORKLOAD_STATE_SUCCEEDED), what="ended")
    for request, words in [
        (child("c1", parent="ghost"), "not known"),
        (child("c2", parent="ended"), "not running"),
        (child("c3", project_id=8), "another project"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            web.StartWorkload(request)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert words in (info.value.details() or "")
    assert sorted(site.runner.servicer.runtime.list_workloads()) == ["ended", "parent"]
    records = sorted(p.name for p in (site.settings.data_dir / "runner" / "records").iterdir())
    assert records == ["ended.json", "parent.json"]


def test_children_die_with_their_parent(site: Site) -> None:  # noqa: F811
    web = site.stub()
    start_parent(site)
    for name in ("c1", "c2"):
        assert web.StartWorkload(child(name)).state == S.WORKLOAD_STATE_RUNNING
    web.StartWorkload(spec("bystander", "exec sleep 300"))  # no parent: not touched
    web.StopWorkload(pb.StopWorkloadRequest(workload_id="parent", grace_seconds=1))
    for name in ("c1", "c2"):
        ended = wait_for(lambda n=name: status_in(web, n, S.WORKLOAD_STATE_STOPPED), what=name)
        assert ended.reason == "stopped" and "its parent parent ended" in ended.message
    assert status_in(web, "bystander", S.WORKLOAD_STATE_RUNNING)


def test_children_of_a_parent_that_died_while_the_runner_was_down_are_stopped(
    site: Site,  # noqa: F811
) -> None:
    web = site.stub()
    start_parent(site)
    web.StartWorkload(child("orphan"))
    parent_pid = site.runner.servicer._records["parent"].runtime_state["pid1"]  # type: ignore[index]
    site.runner.stop()  # workloads keep running without a runner
    os.kill(parent_pid, signal.SIGKILL)  # the parent's sandbox dies meanwhile
    site.restart()
    web = site.stub()
    ended = wait_for(
        lambda: status_in(web, "orphan", S.WORKLOAD_STATE_STOPPED), what="orphan stopped"
    )
    assert "its parent parent ended" in ended.message


def logs_of(site: Site, workload_id: str) -> str:  # noqa: F811
    chunks = site.stub().StreamLogs(pb.StreamLogsRequest(workload_id=workload_id))
    return b"".join(c.data for c in chunks).decode()


SHOW = (
    'echo "url=$KILN_API_URL cdsw=$CDSW_API_URL ssl=$SSL_CERT_FILE req=$REQUESTS_CA_BUNDLE '
    'ca=$KILN_CA_BUNDLE path=$PYTHONPATH"; grep -c "BEGIN CERTIFICATE" /run/kiln/ca-bundle.crt; '
    'python3 -c "from kiln.sdk import workers; print(workers.launch_workers.__name__)"; '
    'python3 -c "import cml.models_v1, cml.metrics_v1, cdsw; print(cdsw.track_metric.__module__)"'
)


def test_sessions_and_jobs_get_the_way_to_the_web_tier_and_the_cml_library(
    site: Site,  # noqa: F811
) -> None:
    web = site.stub()
    port = site.settings.web.port
    session = spec("sess", SHOW, env={"REQUESTS_CA_BUNDLE": "/home/cdsw/mine.pem"})
    session.spec.kind = pb.WORKLOAD_KIND_SESSION
    web.StartWorkload(session)
    wait_for(lambda: status_in(web, "sess", S.WORKLOAD_STATE_SUCCEEDED), what="session")
    first, count, name, library = logs_of(site, "sess").splitlines()
    url = f"https://10.0.2.2:{port}/"
    assert first == (
        f"url={url} cdsw={url}api/v1 ssl=/run/kiln/ca-bundle.crt req=/home/cdsw/mine.pem "
        "ca=/run/kiln/ca-bundle.crt path=/run/kiln/python"
    )
    assert int(count) >= 1 and name == "launch_workers"  # Kiln's CA at least, host CAs too
    assert library == "cml.metrics_v1"
    kiln_ca = (site.settings.pki_dir / "ca.crt").read_text().strip()
    bundle = site.settings.data_dir / "runner" / "web" / "ca-bundle.crt"
    assert bundle.read_text().strip().endswith(kiln_ca)

    # A job run: the same door (no token: cml.metrics_v1 uses the user's API key).
    web.StartWorkload(spec("job", SHOW))
    wait_for(lambda: status_in(web, "job", S.WORKLOAD_STATE_SUCCEEDED), what="job")
    first, _, name, library = logs_of(site, "job").splitlines()
    assert first == (
        f"url={url} cdsw={url}api/v1 ssl=/run/kiln/ca-bundle.crt req=/run/kiln/ca-bundle.crt "
        "ca=/run/kiln/ca-bundle.crt path=/run/kiln/python"
    )
    assert (name, library) == ("launch_workers", "cml.metrics_v1")
