"""The built-in runtime in real sandboxes: one interpreter at /opt/kiln/bin with ``python``,
``python3`` and ``pip`` beside it, and the same PATH in a session's terminal, a job and a
worker, with nothing of the host's own paths in their environment."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.domain.jobs import interpreter
from kiln.runner.service import DEFAULT_EXEC_SHELL, DEFAULT_SESSION_COMMAND
from kiln.runtimes import WorkloadRuntime, WorkloadSpec
from kiln.testing.runtime_contract import (
    TIMEOUT,
    all_logs,
    cleaned_up,
    local_runtime_factory,
    read_until,
    wait_exit,
)

# What each kind of workload reports: the interpreter behind each name, pip, PATH, the env.
PROBE_PY = """\
import json, os, site, sys
print("PY " + json.dumps({
    "executable": sys.executable, "real": os.path.realpath(sys.executable),
    "prefix": sys.prefix, "version": sys.version, "path": os.environ["PATH"],
    "user_site": [site.ENABLE_USER_SITE, site.getusersitepackages()],
    "env": dict(os.environ),
}))
"""
PROBE_SH = """\
python probe.py
python3 probe.py
echo "PIP $(pip --version)"
echo "WHICH $(command -v python) $(command -v python3) $(command -v pip)"
echo "SHEBANG $(head -1 "$(command -v pip)")"
"""


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[WorkloadRuntime]:
    with cleaned_up(local_runtime_factory(tmp_path / "state")()) as made:
        yield made


def report(text: str) -> dict[str, list[str]]:
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        lines.setdefault(kind, []).append(rest)
    return lines


def test_sessions_jobs_and_workers_share_one_python_and_path(
    runtime: WorkloadRuntime, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "probe.py").write_text(PROBE_PY)
    (project / "probe.sh").write_text(PROBE_SH)

    # A job runs its script the way the runner does: by extension (python3 x.py, bash x.sh).
    job = WorkloadSpec(
        id="job-probe", project_dir=project, command=(*interpreter("x.sh"), "probe.sh")
    )
    runtime.start(job)
    assert wait_exit(runtime, job.id) == 0, all_logs(runtime, job.id)
    in_job = report(all_logs(runtime, job.id).decode())

    # A worker: python3 -c CODE, as the Workers API starts one.
    worker = WorkloadSpec(
        id="worker-probe", project_dir=project, command=("python3", "-c", PROBE_PY)
    )
    runtime.start(worker)
    assert wait_exit(runtime, worker.id) == 0, all_logs(runtime, worker.id)
    in_worker = report(all_logs(runtime, worker.id).decode())

    # A session: the keep-alive, and a terminal as the web page opens one (a login shell).
    session = WorkloadSpec(id="session-probe", project_dir=project, command=DEFAULT_SESSION_COMMAND)
    runtime.start(session)
    with runtime.exec(session.id, list(DEFAULT_EXEC_SHELL), tty=True) as terminal:
        terminal.write(b"bash probe.sh > session.out 2>&1; echo done-$((40 + 2))\n")
        read_until(terminal, b"done-42")
        terminal.write(b"exit\n")
        terminal.wait(TIMEOUT)
    in_session = report((project / "session.out").read_text())

    pythons = [json.loads(p) for r in (in_job, in_worker, in_session) for p in r["PY"]]
    assert len(pythons) == 5
    assert {p["real"] for p in pythons} == {os.path.realpath(sys._base_executable)}  # type: ignore[attr-defined]
    assert {p["executable"] for p in pythons} <= {"/opt/kiln/bin/python", "/opt/kiln/bin/python3"}
    assert {p["prefix"] for p in pythons} == {"/opt/kiln"}
    assert {p["version"] for p in pythons} == {sys.version}
    assert {p["path"] for p in pythons} == {"/opt/kiln/bin:/usr/local/bin:/usr/bin:/bin"}
    # pip installs into the project's ~/.local (the environment itself is read-only).
    assert {tuple(p["user_site"]) for p in pythons} == {
        (
            True,
            f"/home/cdsw/.local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages",
        )
    }
    for where in (in_job, in_session):
        assert where["WHICH"] == ["/opt/kiln/bin/python /opt/kiln/bin/python3 /opt/kiln/bin/pip"]
        assert where["SHEBANG"][0].startswith("#!/opt/kiln/bin/python")
        assert "/opt/kiln/lib/python" in where["PIP"][0]
    assert in_job["PIP"] == in_session["PIP"]

    host_paths = {sys.prefix, sys.base_prefix, os.path.realpath(sys.base_prefix), "/root"}
    for p in pythons:
        leaks = {k: v for k, v in p["env"].items() if any(h in v for h in host_paths)}
        assert leaks == {}, "a host path in the sandbox's environment"
