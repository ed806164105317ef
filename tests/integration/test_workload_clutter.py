"""Tools run in a real sandbox leave nothing in the project: IPython, pip, npm and Jupyter keep
their caches and state in the workload's private /tmp; only what a user installs on purpose
(``pip install`` -> ~/.local) would stay."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtimes import WorkloadRuntime, WorkloadSpec
from kiln.runtimes.base import TOOL_STATE_ENV
from kiln.testing.runtime_contract import all_logs, cleaned_up, local_runtime_factory, wait_exit

# Each tool is run the way people run it in a terminal or a job; every one of them writes its
# state under HOME unless told otherwise.
TOOLS = """\
set -e
ipython -c 'print("ipython", 40 + 2)'
python -c 'import IPython; IPython.start_ipython(argv=["-c", "print(1)"])'
pip list > /dev/null
pip cache dir
jupyter --paths > /dev/null
jupyter kernelspec list > /dev/null
python -c 'import jupyter_core.paths as p; print(p.jupyter_runtime_dir())'
printf 'print(1)\\n' | python -i > /dev/null 2>&1 || true
if command -v npm > /dev/null; then npm cache verify > /dev/null; npm config get cache; fi
echo tools-done
"""


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[WorkloadRuntime]:
    with cleaned_up(local_runtime_factory(tmp_path / "state")()) as made:
        yield made


def test_tools_keep_their_state_out_of_the_project(
    runtime: WorkloadRuntime, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tools.sh").write_text(TOOLS)
    spec = WorkloadSpec(id="job-tools", project_dir=project, command=("bash", "tools.sh"))
    runtime.start(spec)
    code = wait_exit(runtime, spec.id, timeout=120)
    out = all_logs(runtime, spec.id).decode()
    assert code == 0, out
    assert "ipython 42" in out and out.rstrip().endswith("tools-done")
    assert "/tmp/.cache/pip" in out and "/tmp/.jupyter-runtime" in out
    if shutil.which("npm"):
        assert "/tmp/.npm" in out
    # Python's interactive history is the one thing this Python version cannot be told to
    # put elsewhere: the templates' .gitignore covers it.
    assert sorted(p.name for p in project.iterdir()) in (
        ["tools.sh"],
        [".python_history", "tools.sh"],
    )


def test_every_tool_state_path_is_in_the_private_tmp() -> None:
    assert all(value.startswith("/tmp/.") for value in TOOL_STATE_ENV.values())


def test_the_template_ignores_what_remains(tmp_path: Path) -> None:
    """What tools and pip may still write in a project is ignored by git in the template."""
    from kiln.storage.store import TEMPLATES_DIR

    repo = tmp_path / "repo"
    shutil.copytree(TEMPLATES_DIR / "python-starter", repo)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for name in (
        ".local/lib/python3.11/site-packages/x.py",
        ".ipython/profile_default/history.sqlite",
        ".jupyter/lab/user-settings/x",
        ".npm/_logs/debug.log",
        ".cache/pip/x",
        ".ipynb_checkpoints/a-checkpoint.ipynb",
        "__pycache__/main.cpython-311.pyc",
        ".python_history",
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    status = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert sorted(filter(None, status)) == [
        "?? .gitignore",
        "?? README.md",
        "?? main.py",
        "?? requirements.txt",
    ]
