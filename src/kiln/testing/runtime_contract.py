"""The contract every ``WorkloadRuntime`` must pass, as a reusable pytest class.

Use it by subclassing in a test module and providing one fixture::

    class TestMyRuntime(RuntimeContract):
        @pytest.fixture
        def runtime_factory(self, tmp_path):
            # Each call returns a new instance over the SAME backing state, as a restarted
            # runner would create; the contract closes them.
            return lambda: MyRuntime(tmp_path / "state")

The runtime under test must offer ``sh`` and ``python3`` in the workloads it starts (the
built-in runtime and every Kiln runtime image do). Every test cleans up what it started.

Tests marked ``@needs_process`` observe what the workload's own process does (its output, its
exit status, files it writes). A subclass whose workloads run no process where it is tested
(the ``kubernetes`` runtime on KWOK's fake nodes) sets ``runs_processes = False`` with the
reason in ``no_process_reason``: those tests then skip, saying so, and the rest still run.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kiln.runtimes.base import (
    Endpoint,
    ExecProcess,
    ExitReason,
    NetworkPolicy,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadRuntime,
    WorkloadSpec,
)

RuntimeFactory = Callable[[], WorkloadRuntime]
TIMEOUT = 30.0  # generous: CI machines are shared


def unique_id(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_exit(runtime: WorkloadRuntime, workload_id: str, timeout: float = TIMEOUT) -> int:
    """Poll until the workload ends; its exit status. Uses only the base contract."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = runtime.poll(workload_id)
        if code is not None:
            return code
        time.sleep(0.02)
    raise AssertionError(f"workload {workload_id} still running after {timeout}s")


def all_logs(runtime: WorkloadRuntime, workload_id: str, since: int = 0) -> bytes:
    return b"".join(runtime.logs(workload_id, since=since))


def wait_for_log(
    runtime: WorkloadRuntime, workload_id: str, needle: bytes, timeout: float = TIMEOUT
) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = all_logs(runtime, workload_id)
        if needle in text:
            return text
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not in the logs of {workload_id}: {text[-2000:]!r}")


def read_until(process: ExecProcess, needle: bytes, timeout: float = TIMEOUT) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while needle not in got:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} never appeared; got {got!r}")
        try:
            chunk = process.read(timeout=remaining)
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"output ended before {needle!r}; got {got!r}")
        got += chunk
    return got


def read_all(process: ExecProcess, timeout: float = TIMEOUT) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = process.read(timeout=max(deadline - time.monotonic(), 0.01))
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"output did not end within {timeout}s: {got!r}")


_Test = TypeVar("_Test", bound=Callable[..., Any])


def needs_process(test: _Test) -> _Test:
    """The test observes the workload's own process: skipped where none runs."""

    @functools.wraps(test)
    def run(self: RuntimeContract, *args: Any, **kwargs: Any) -> Any:
        if not self.runs_processes:
            pytest.skip(f"NOTICE: no workload process runs here: {self.no_process_reason}")
        return test(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class RuntimeContract:
    """Behaviour the runner relies on. Subclasses provide ``runtime_factory``."""

    runs_processes = True
    no_process_reason = ""

    @pytest.fixture
    def runtime_factory(self) -> RuntimeFactory:  # pragma: no cover - overridden
        raise NotImplementedError("provide a runtime_factory fixture")

    @pytest.fixture
    def runtimes(self, runtime_factory: RuntimeFactory) -> Iterator[list[WorkloadRuntime]]:
        """Every instance a test creates; at the end their workloads are stopped and removed."""
        made: list[WorkloadRuntime] = []
        yield made
        ended: set[str] = set()  # by the newest instance: an older (closed) one watches none
        for rt in reversed(made):
            for workload_id in rt.list_workloads():
                if workload_id in ended:
                    continue
                ended.add(workload_id)
                with contextlib.suppress(Exception):
                    rt.stop(workload_id, grace=0)
                with contextlib.suppress(Exception):
                    rt.remove(workload_id)
            rt.close()

    @pytest.fixture
    def new_runtime(
        self, runtime_factory: RuntimeFactory, runtimes: list[WorkloadRuntime]
    ) -> RuntimeFactory:
        def make() -> WorkloadRuntime:
            rt = runtime_factory()
            runtimes.append(rt)
            return rt

        return make

    @pytest.fixture
    def runtime(self, new_runtime: RuntimeFactory) -> WorkloadRuntime:
        return new_runtime()

    @pytest.fixture
    def project(self, tmp_path: Path) -> Path:
        path = tmp_path / "project"
        path.mkdir()
        (path / "hello.txt").write_text("hello from the project\n")
        return path

    def spec(self, project: Path, script: str, **kwargs: object) -> WorkloadSpec:
        fields: dict[str, object] = {"memory_bytes": 512 * 1024**2, "pids_max": 256}
        fields.update(kwargs)
        return WorkloadSpec(
            id=str(fields.pop("id", unique_id())),
            project_dir=project,
            command=("sh", "-c", script),
            **fields,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------ lifecycle

    @needs_process
    def test_runs_command_and_reports_exit_code(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        spec = self.spec(project, "cat hello.txt; exit 7")
        assert runtime.start(spec) is None  # no port declared → no endpoint
        assert wait_exit(runtime, spec.id) == 7
        status = runtime.status(spec.id)
        assert not status.running and status.exit_code == 7
        assert status.reason == ExitReason.EXITED
        assert b"hello from the project" in all_logs(runtime, spec.id)

    @needs_process
    def test_poll_is_none_while_running(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "while [ ! -e go ]; do sleep 0.05; done; exit 0")
        runtime.start(spec)
        time.sleep(0.3)
        assert runtime.poll(spec.id) is None
        assert runtime.status(spec.id).running
        (project / "go").touch()
        assert wait_exit(runtime, spec.id) == 0

    def test_poll_of_unknown_workload_raises(self, runtime: WorkloadRuntime) -> None:
        with pytest.raises(WorkloadNotFound):
            runtime.poll("never-started")

    @needs_process
    def test_signal_death_is_128_plus_signal(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "kill -KILL $$")
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 137

    @needs_process
    def test_missing_command_fails_with_a_reason(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        from dataclasses import replace

        spec = replace(self.spec(project, "true"), command=("no-such-program",))
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) != 0
        # In the output (a sandbox's own error), or the status message (Kubernetes reports
        # runc's failure to exec as the container's termination message).
        reason = all_logs(runtime, spec.id) + runtime.status(spec.id).message.encode()
        assert b"no-such-program" in reason

    @needs_process
    def test_list_and_remove(self, runtime: WorkloadRuntime, project: Path) -> None:
        running = self.spec(project, "sleep 30")
        done = self.spec(project, "true")
        runtime.start(running)
        runtime.start(done)
        wait_exit(runtime, done.id)
        assert set(runtime.list_workloads()) == {running.id, done.id}
        with pytest.raises(Exception, match="running"):
            runtime.remove(running.id)  # a running workload is stopped first, never dropped
        runtime.remove(done.id)
        assert runtime.list_workloads() == [running.id]
        with pytest.raises(WorkloadNotFound):
            runtime.poll(done.id)
        with pytest.raises(WorkloadNotFound):
            runtime.logs(done.id)

    def test_duplicate_id_is_refused(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "sleep 30")
        runtime.start(spec)
        with pytest.raises(WorkloadExists):
            runtime.start(spec)

    def test_invalid_spec_is_refused_and_leaves_nothing(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        with pytest.raises(ValueError):
            runtime.start(self.spec(project, "true", id="../escape"))
        with pytest.raises(ValueError):
            runtime.start(self.spec(project, "true", env={"LD PRELOAD": "x"}))
        assert runtime.list_workloads() == []

    @needs_process
    def test_environment_is_passed(self, runtime: WorkloadRuntime, project: Path) -> None:
        env = {"KILN_TEST_VALUE": "spaces and 'quotes' $HOME", "CDSW_PROJECT": "demo"}
        spec = self.spec(
            project, 'printf "%s|%s|%s\\n" "$KILN_TEST_VALUE" "$CDSW_PROJECT" "$HOME"', env=env
        )
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        assert b"spaces and 'quotes' $HOME|demo|/home/cdsw\n" in all_logs(runtime, spec.id)

    @needs_process
    def test_project_files_are_writable_at_home(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        spec = self.spec(project, "pwd; echo written > /home/cdsw/out.txt")
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        assert (project / "out.txt").read_text() == "written\n"
        assert all_logs(runtime, spec.id).startswith(b"/home/cdsw\n")

    # ------------------------------------------- build-style filesystems

    @needs_process
    def test_sized_tmpfs_is_private_and_bounded(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        """A bounded scratch directory: writable, full at its size (the workload sees
        ENOSPC, nothing reaches the host), gone with the workload. One at /home/cdsw hides
        the project."""
        script = (
            "echo kept > /opt/scratch/small && cat /opt/scratch/small; "
            "python3 -c \"open('/opt/scratch/big', 'wb').write(b'x' * 9 * 1024 * 1024)\" "
            "2>&1 | tail -n 1; "
            "ls /home/cdsw | wc -l; echo hidden > /home/cdsw/note"
        )
        spec = self.spec(
            project,
            script,
            tmpfs=(("/opt/scratch", 4 * 1024**2), ("/home/cdsw", 2 * 1024**2)),
        )
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        out = all_logs(runtime, spec.id).decode()
        assert out.startswith("kept\n"), out
        assert "No space left on device" in out, out
        assert out.endswith("0\n"), out  # the project's hello.txt is not there
        assert sorted(p.name for p in project.iterdir()) == ["hello.txt"]

    @needs_process
    def test_writable_file_bind_with_a_file_size_limit(
        self, runtime: WorkloadRuntime, project: Path, tmp_path: Path
    ) -> None:
        """A build's output: one host file the workload may write, up to max_file_bytes, and
        no other place on the host it can grow (the root and the binds' parents are
        read-only)."""
        out_dir = tmp_path / "out"
        out_dir.mkdir(mode=0o700)  # the workload uid cannot reach it: the runtime stages it
        result = out_dir / "result.bin"
        result.touch()  # owned by root: the runtime hands it to the workload's user
        script = (
            "python3 -c \"open('/kiln/out/result.bin', 'wb').write(b'r' * 1024)\"; "
            "python3 -c \"open('/kiln/out/result.bin', 'ab').write(b'x' * 3 * 1024 * 1024)\" "
            "2>&1 | tail -n 1; "
            "touch /kiln/out/other 2>/dev/null || echo no-other-file"
        )
        spec = self.spec(
            project,
            script,
            writable_binds=((result, "/kiln/out/result.bin"),),
            max_file_bytes=2 * 1024**2,
        )
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        out = all_logs(runtime, spec.id).decode()
        assert "File too large" in out and out.endswith("no-other-file\n")
        assert result.stat().st_size == 2 * 1024**2  # filled up to the limit, not beyond
        assert sorted(p.name for p in out_dir.iterdir()) == ["result.bin"]

    # ----------------------------------------------------------------- stop

    @needs_process
    def test_stop_is_graceful_first(self, runtime: WorkloadRuntime, project: Path) -> None:
        script = "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
        spec = self.spec(project, script)
        runtime.start(spec)
        wait_for_log(runtime, spec.id, b"ready")
        runtime.stop(spec.id, grace=10)
        status = runtime.status(spec.id)
        assert status.exit_code == 0 and status.reason == ExitReason.STOPPED
        assert b"got-term" in all_logs(runtime, spec.id)

    @needs_process
    def test_stop_kills_after_grace(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "trap '' TERM; echo ready; while :; do sleep 0.05; done")
        runtime.start(spec)
        wait_for_log(runtime, spec.id, b"ready")
        started = time.monotonic()
        runtime.stop(spec.id, grace=0.5)
        assert time.monotonic() - started < 10
        status = runtime.status(spec.id)
        assert status.exit_code == 137 and status.reason == ExitReason.STOPPED
        runtime.stop(spec.id)  # stopping an ended workload does nothing

    # ----------------------------------------------------------------- logs

    @needs_process
    def test_logs_are_live(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "echo first; while [ ! -e go ]; do sleep 0.05; done; echo last")
        runtime.start(spec)
        stream = runtime.logs(spec.id, follow=True)
        assert next(stream).startswith(b"first\n")  # arrives while the workload still runs
        assert runtime.poll(spec.id) is None
        (project / "go").touch()
        rest = b"".join(stream)  # follow ends once the workload has ended
        assert rest.endswith(b"last\n")
        assert runtime.poll(spec.id) == 0

    @needs_process
    def test_logs_kept_after_exit_and_readable_from_offset(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        spec = self.spec(project, "echo out; echo err >&2; seq 1 2000")
        runtime.start(spec)
        wait_exit(runtime, spec.id)
        text = all_logs(runtime, spec.id)
        assert text.startswith(b"out\nerr\n1\n") and text.endswith(b"\n2000\n")
        assert all_logs(runtime, spec.id, since=8) == text[8:]
        assert b"".join(runtime.logs(spec.id, follow=True)) == text

    # ----------------------------------------------------------------- exec

    @needs_process
    def test_exec_with_tty(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "sleep 60")
        runtime.start(spec)
        with runtime.exec(spec.id, ["sh"], tty=True, rows=30, cols=100) as term:
            # The terminal echoes input, so each expected output differs from what is typed.
            term.write(b"stty size; echo hel''lo; [ -t 0 ] && echo tty-$((40 + 2))\n")
            out = read_until(term, b"tty-42")
            assert b"hello" in out and b"30 100" in out
            term.resize(40, 120)
            term.write(b"stty size\n")
            read_until(term, b"40 120")
            term.write(b"exit 3\n")
            assert term.wait(TIMEOUT) == 3

    @needs_process
    def test_exec_without_tty(self, runtime: WorkloadRuntime, project: Path) -> None:
        spec = self.spec(project, "sleep 60", env={"FROM_SPEC": "spec-value"})
        runtime.start(spec)
        with runtime.exec(
            spec.id, ["sh", "-c", 'echo "$FROM_SPEC $EXTRA $(pwd)"; cat; exit 4'],
            env={"EXTRA": "extra-value"},
        ) as process:  # fmt: skip
            process.write(b"from-stdin\n")
            process.close_stdin()
            out = read_all(process)
            assert out == b"spec-value extra-value /home/cdsw\nfrom-stdin\n"
            assert process.wait(TIMEOUT) == 4

    # ------------------------------------------------------------- endpoint

    @needs_process
    def test_declared_port_is_reachable_through_the_endpoint(
        self, runtime: WorkloadRuntime, project: Path
    ) -> None:
        server = (
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 8080)); s.listen(1); print('listening', flush=True)\n"
            "c, _ = s.accept(); c.sendall(b'hello-from-workload'); c.close()\n"
        )
        (project / "server.py").write_text(server)
        spec = self.spec(project, "exec python3 server.py", port=8080)
        endpoint = runtime.start(spec)
        assert isinstance(endpoint, Endpoint)
        wait_for_log(runtime, spec.id, b"listening")
        with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as conn:
            assert conn.recv(100) == b"hello-from-workload"
        assert wait_exit(runtime, spec.id) == 0

    # ------------------------------------------------------------ re-attach

    @needs_process
    def test_state_round_trip_reattaches(self, new_runtime: RuntimeFactory, project: Path) -> None:
        first = new_runtime()
        spec = self.spec(
            project,
            "echo before; while [ ! -e go ]; do sleep 0.05; done; echo after; exit 5",
            network=NetworkPolicy(),
        )
        first.start(spec)
        wait_for_log(first, spec.id, b"before")
        state = first.get_state(spec.id)
        first.close()  # the runner goes away; the workload keeps running

        second = new_runtime()
        second.load_state(state)
        assert second.poll(spec.id) is None
        with second.exec(spec.id, ["sh", "-c", "echo attached"]) as process:
            assert read_all(process) == b"attached\n"
        (project / "go").touch()
        assert wait_exit(second, spec.id) == 5
        assert all_logs(second, spec.id) == b"before\nafter\n"
        assert second.status(spec.id).reason == ExitReason.EXITED

    @needs_process
    def test_reattach_to_workload_that_ended_meanwhile(
        self, new_runtime: RuntimeFactory, project: Path
    ) -> None:
        first = new_runtime()
        spec = self.spec(project, "while [ ! -e go ]; do sleep 0.05; done; echo bye; exit 9")
        first.start(spec)
        state = first.get_state(spec.id)
        first.close()
        (project / "go").touch()
        time.sleep(1.0)  # it ends (and prints) while no runtime instance watches it
        second = new_runtime()
        second.load_state(state)
        assert wait_exit(second, spec.id) == 9
        assert all_logs(second, spec.id) == b"bye\n"


@contextlib.contextmanager
def cleaned_up(runtime: WorkloadRuntime) -> Iterator[WorkloadRuntime]:
    """``runtime``, then every workload it still knows stopped and removed, and it closed
    (sandboxes outlive a runtime object by design: a test must end them itself)."""
    try:
        yield runtime
    finally:
        for workload_id in runtime.list_workloads():
            runtime.stop(workload_id, grace=0)
            runtime.remove(workload_id)
        runtime.close()


def local_runtime_factory(state_dir: Path, **options: object) -> RuntimeFactory:
    """Factory for the ``local`` runtime over one state directory. Where the host cannot run
    sandboxes at all, the test is skipped with the reason (a failure under ``CI=true``)."""
    import os

    from kiln.runtimes.base import RuntimeUnavailable
    from kiln.runtimes.local import LocalRuntime

    def make() -> WorkloadRuntime:
        try:
            return LocalRuntime(state_dir, **options)  # type: ignore[arg-type]
        except RuntimeUnavailable as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"the local runtime is required under CI=true: {exc}")
            pytest.skip(f"NOTICE: the local runtime cannot run here: {exc}")

    return make
