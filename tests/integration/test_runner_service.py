"""The real runner: ``start_runner`` (mTLS gRPC server, LocalRuntime sandboxes) called as the
web tier over a real TLS connection with certificates from Kiln's CA."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from kiln.rpc import runner_pb2 as pb
from kiln.rpc.identity import Service
from kiln.rpc.runner_pb2_grpc import RunnerStub
from kiln.rpc.testing import TestPki
from kiln.rpc.tls import ServiceChannel
from kiln.runner.process import RunningRunner, start_runner
from kiln.settings import Settings

T = TypeVar("T")
PROJECT = 7
S = pb.WorkloadState


def wait_for(probe: Callable[[], T | None], timeout: float = 15.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(0.05)


@dataclass
class Site:
    settings: Settings
    pki: TestPki
    runner: RunningRunner
    channels: list[ServiceChannel]

    def stub(self, service: Service = Service.WEB) -> RunnerStub:
        channel = ServiceChannel(
            f"127.0.0.1:{self.runner.port}", Service.RUNNER, self.pki.files(service)
        )
        self.channels.append(channel)
        return RunnerStub(channel.get())

    def restart(self) -> None:
        self.runner.stop()
        self.runner = start_runner(self.settings, port=0)

    @property
    def project_dir(self) -> Path:
        return self.settings.projects_dir / str(PROJECT)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    data = tmp_path / "data"
    pki = TestPki(data / "pki")
    settings = Settings(data_dir=data, env="test")
    (settings.projects_dir / str(PROJECT)).mkdir(parents=True)
    try:
        runner = start_runner(settings, port=0)
    except Exception as exc:  # pragma: no cover - hosts that cannot build sandboxes
        from kiln.runtimes.base import RuntimeUnavailable

        if isinstance(exc, RuntimeUnavailable):
            pytest.skip(f"NOTICE: the local runtime cannot run here: {exc}")
        raise
    s = Site(settings, pki, runner, [])
    try:
        yield s
    finally:
        for channel in s.channels:
            channel.close()
        runtime = s.runner.servicer.runtime
        for workload_id in runtime.list_workloads():
            runtime.stop(workload_id, grace=0)
            runtime.remove(workload_id)
        s.runner.stop()


def spec(workload_id: str, script: str, **extra: Any) -> pb.StartWorkloadRequest:
    return pb.StartWorkloadRequest(
        spec=pb.WorkloadSpec(
            workload_id=workload_id,
            kind=pb.WORKLOAD_KIND_JOB_RUN,
            project_id=extra.pop("project_id", PROJECT),
            user_id=1,
            command=["sh", "-c", script],
            resources=extra.pop("resources", pb.Resources(cpu=0.5, memory_bytes=256 * 1024**2)),
            labels={"run": workload_id},
            **extra,
        )
    )


def status_in(stub: RunnerStub, workload_id: str, *states: int) -> pb.WorkloadStatus | None:
    status = stub.GetStatus(pb.GetStatusRequest(workload_id=workload_id))
    return status if status.state in states else None


def test_start_status_live_logs_stop(site: Site) -> None:
    web = site.stub()
    started = web.StartWorkload(spec("w1", "echo hello; exec sleep 300"))
    assert started.state == S.WORKLOAD_STATE_RUNNING
    assert started.kind == pb.WORKLOAD_KIND_JOB_RUN and dict(started.labels) == {"run": "w1"}
    assert started.created_at.seconds > 0 and not started.HasField("exit_code")

    stream = web.StreamLogs(pb.StreamLogsRequest(workload_id="w1", follow=True))
    seen = b""
    for chunk in stream:
        assert chunk.offset == len(seen)
        seen += chunk.data
        if b"hello\n" in seen:
            break
    assert seen == b"hello\n"
    # Seen while it still runs: the stream is live, not a replay after the end.
    assert status_in(web, "w1", S.WORKLOAD_STATE_RUNNING)

    stopped = web.StopWorkload(
        pb.StopWorkloadRequest(workload_id="w1", grace_seconds=2, reason="stopped by alice")
    )
    assert stopped.state == S.WORKLOAD_STATE_STOPPED
    assert stopped.reason == "stopped" and stopped.message == "stopped by alice"
    assert stopped.exit_code == 143  # sleep died of SIGTERM
    assert stopped.finished_at.seconds >= stopped.started_at.seconds > 0
    assert list(stream) == []  # the follower ends once the workload has ended
    # Stop is idempotent and keeps the outcome.
    again = web.StopWorkload(pb.StopWorkloadRequest(workload_id="w1"))
    assert (again.state, again.exit_code) == (S.WORKLOAD_STATE_STOPPED, 143)


def test_exit_codes_offsets_and_timeout(site: Site) -> None:
    web = site.stub()
    web.StartWorkload(spec("ok", "printf 'line one\\nline two\\n'"))
    web.StartWorkload(spec("bad", "echo oops >&2; exit 3"))
    web.StartWorkload(spec("slow", "exec sleep 300", timeout_seconds=1))
    ok = wait_for(lambda: status_in(web, "ok", S.WORKLOAD_STATE_SUCCEEDED), what="ok")
    assert (ok.exit_code, ok.reason) == (0, "exited")
    chunks = list(web.StreamLogs(pb.StreamLogsRequest(workload_id="ok", offset=5)))
    assert b"".join(c.data for c in chunks) == b"one\nline two\n"
    assert chunks[0].offset == 5
    bad = wait_for(lambda: status_in(web, "bad", S.WORKLOAD_STATE_FAILED), what="bad")
    assert (bad.exit_code, bad.reason) == (3, "exited")
    logs = web.StreamLogs(pb.StreamLogsRequest(workload_id="bad", follow=True))
    assert b"".join(c.data for c in logs) == b"oops\n"  # an ended workload: follow just ends
    slow = wait_for(lambda: status_in(web, "slow", S.WORKLOAD_STATE_FAILED), what="timeout")
    assert slow.reason == "timeout" and slow.exit_code == 143


def exec_inputs(*messages: pb.ExecInput) -> Iterator[pb.ExecInput]:
    yield from messages


def run_exec(web: RunnerStub, *messages: pb.ExecInput) -> tuple[bytes, pb.ExecExit]:
    output, exits = b"", []
    for out in web.Exec(exec_inputs(*messages), timeout=20):
        kind = out.WhichOneof("output")
        if kind == "exit":
            exits.append(out.exit)
        else:
            assert not exits, "exit must be the last message"
            output += getattr(out, kind)
    assert len(exits) == 1
    return output, exits[0]


def test_exec_with_a_pty_and_with_pipes(site: Site) -> None:
    web = site.stub()
    web.StartWorkload(spec("sess", "exec sleep 300"))
    start = pb.ExecStart(
        workload_id="sess",
        command=["sh", "-c", "echo hello; [ -t 0 ] && stty size; exit 4"],
        tty=True,
        rows=30,
    )
    output, exit_ = run_exec(web, pb.ExecInput(start=start))
    assert (output, exit_.exit_code) == (b"hello\r\n30 80\r\n", 4)

    start = pb.ExecStart(workload_id="sess", command=["sh", "-c", "cat; echo done"])
    output, exit_ = run_exec(
        web,
        pb.ExecInput(start=start),
        pb.ExecInput(stdin=b"typed\n"),
        pb.ExecInput(close_stdin=True),
    )
    assert (output, exit_.exit_code) == (b"typed\ndone\n", 0)

    with pytest.raises(grpc.RpcError) as info:
        run_exec(web, pb.ExecInput(stdin=b"no start first"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        run_exec(web, pb.ExecInput(start=pb.ExecStart(workload_id="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        run_exec(web, pb.ExecInput(start=pb.ExecStart(workload_id="sess", tty=True, rows=70000)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_exec_is_torn_down_when_the_client_goes_away(site: Site) -> None:
    web = site.stub()
    web.StartWorkload(spec("sess", "exec sleep 300"))
    marker = "kiln-exec-teardown"
    start = pb.ExecStart(workload_id="sess", command=["sh", "-c", f"echo {marker}; cat"], tty=True)

    release = threading.Event()

    def inputs() -> Iterator[pb.ExecInput]:
        yield pb.ExecInput(start=start)
        release.wait(60)  # the client never closes its side; the call is cancelled instead

    call = web.Exec(inputs())
    for out in call:
        if marker.encode() in out.stdout:
            break

    def exec_alive() -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker.encode() in cmdline.read_bytes():
                    return True
            except OSError:
                continue
        return False

    assert exec_alive()
    call.cancel()
    release.set()
    wait_for(lambda: not exec_alive(), timeout=3, what="the exec'd process to be killed")
    assert status_in(web, "sess", S.WORKLOAD_STATE_RUNNING)  # the workload itself lives on


def test_start_is_idempotent(site: Site) -> None:
    web = site.stub()
    first = web.StartWorkload(spec("same", "exec sleep 300"))
    second = web.StartWorkload(spec("same", "echo a different command"))
    assert first.created_at == second.created_at
    assert second.state == S.WORKLOAD_STATE_RUNNING
    assert site.runner.servicer.runtime.list_workloads() == ["same"]


def test_unknown_workload_is_not_found(site: Site) -> None:
    web = site.stub()
    for call in (
        lambda: web.GetStatus(pb.GetStatusRequest(workload_id="ghost")),
        lambda: web.StopWorkload(pb.StopWorkloadRequest(workload_id="ghost")),
        lambda: list(web.StreamLogs(pb.StreamLogsRequest(workload_id="ghost"))),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"project_id": 999}, "project 999 has no files"),
        ({"project_id": 0}, "project_id"),
        ({"env": {"BAD NAME": "x"}}, "environment variable"),
        ({"working_dir": "/home/cdsw/../../etc"}, "sandbox path"),
        ({"resources": pb.Resources(gpu=1)}, "GPU"),
        ({"image_home": True}, "project_mount=False needs an image"),
    ],
)
def test_bad_spec_is_invalid_argument_and_starts_nothing(
    site: Site, extra: dict[str, Any], words: str
) -> None:
    web = site.stub()
    with pytest.raises(grpc.RpcError) as info:
        web.StartWorkload(spec("bad-spec", "touch /home/cdsw/ran", **extra))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (info.value.details() or "")
    assert site.runner.servicer.runtime.list_workloads() == []
    assert not list((site.settings.data_dir / "runner" / "records").iterdir())
    with pytest.raises(grpc.RpcError) as info:
        web.GetStatus(pb.GetStatusRequest(workload_id="bad-spec"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_symlinked_project_dir_is_refused(site: Site, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (site.settings.projects_dir / "8").symlink_to(elsewhere)
    with pytest.raises(grpc.RpcError) as info:
        site.stub().StartWorkload(spec("link", "touch /home/cdsw/ran", project_id=8))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (elsewhere / "ran").exists()


def test_builder_identity_is_refused(site: Site) -> None:
    builder = site.stub(Service.BUILDER)
    with pytest.raises(grpc.RpcError) as info:
        builder.StartWorkload(spec("from-builder", "touch /home/cdsw/ran"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert site.runner.servicer.runtime.list_workloads() == []
    assert builder.Ping(pb.PingRequest()).caller_identity == Service.BUILDER.spiffe_id


def test_a_restarted_runner_reattaches(site: Site) -> None:
    web = site.stub()
    script = "echo up; while [ ! -e /home/cdsw/go ]; do sleep 0.05; done; echo bye; exit 7"
    web.StartWorkload(spec("survivor", script))
    web.StartWorkload(spec("finished", "echo early"))
    wait_for(lambda: status_in(web, "finished", S.WORKLOAD_STATE_SUCCEEDED), what="finished")

    site.restart()  # a new servicer, runtime and server over the same state directory
    web = site.stub()
    status = web.GetStatus(pb.GetStatusRequest(workload_id="survivor"))
    assert status.state == S.WORKLOAD_STATE_RUNNING and dict(status.labels) == {"run": "survivor"}
    done = web.GetStatus(pb.GetStatusRequest(workload_id="finished"))
    assert (done.state, done.exit_code) == (S.WORKLOAD_STATE_SUCCEEDED, 0)

    stream = web.StreamLogs(pb.StreamLogsRequest(workload_id="survivor", follow=True))
    (site.project_dir / "go").touch()
    assert b"".join(c.data for c in stream) == b"up\nbye\n"
    ended = web.GetStatus(pb.GetStatusRequest(workload_id="survivor"))
    assert (ended.state, ended.exit_code, ended.reason) == (S.WORKLOAD_STATE_FAILED, 7, "exited")


def test_log_cap_and_exec_into_an_ended_workload(site: Site) -> None:
    web = site.stub()
    web.StartWorkload(spec("chatty", "yes | head -c 5000", log_limit_bytes=100))
    wait_for(lambda: status_in(web, "chatty", S.WORKLOAD_STATE_SUCCEEDED), what="chatty")
    chunks = list(web.StreamLogs(pb.StreamLogsRequest(workload_id="chatty")))
    data = b"".join(c.data for c in chunks)
    assert data.startswith(b"y\n" * 50) and b"output truncated after 100 bytes" in data
    assert all(c.truncated for c in chunks)
    with pytest.raises(grpc.RpcError) as info:
        run_exec(web, pb.ExecInput(start=pb.ExecStart(workload_id="chatty", command=["true"])))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
