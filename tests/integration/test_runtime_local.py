"""The runtime contract, run against the real ``local`` runtime (bubblewrap sandboxes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.testing.runtime_contract import RuntimeContract, RuntimeFactory, local_runtime_factory


class TestLocalRuntimeContract(RuntimeContract):
    @pytest.fixture
    def runtime_factory(self, tmp_path: Path) -> RuntimeFactory:
        return local_runtime_factory(tmp_path / "state")


def test_readonly_binds_show_extra_host_directories(tmp_path: Path) -> None:
    """How a session gets, say, Kiln's own virtualenv: read-only, at a path of its choosing."""
    from kiln.runtimes import WorkloadSpec
    from kiln.testing.runtime_contract import all_logs, wait_exit

    tools = tmp_path / "hidden" / "tools"  # inside a 0700 directory: staged by root
    tools.mkdir(parents=True)
    (tmp_path / "hidden").chmod(0o700)
    (tools / "hello.sh").write_text("echo tool-ran\n")
    project = tmp_path / "project"
    project.mkdir()
    runtime = local_runtime_factory(tmp_path / "state")()
    try:
        spec = WorkloadSpec(
            id="binds",
            project_dir=project,
            command=(
                "sh",
                "-c",
                "sh /opt/tools/hello.sh; touch /opt/tools/x 2>/dev/null || echo read-only",
            ),
            readonly_binds=((tools, "/opt/tools"),),
        )
        runtime.start(spec)
        assert wait_exit(runtime, spec.id) == 0
        assert all_logs(runtime, spec.id).endswith(b"tool-ran\nread-only\n")
        assert not (tools / "x").exists()
    finally:
        for workload_id in runtime.list_workloads():
            runtime.remove(workload_id)
        runtime.close()
