"""The built-in runtime's Python, pure parts: what /opt/kiln is made of, how entry-point
scripts are rewritten to run inside the sandbox, PATH, and the login profile that keeps it.
The real sandboxes are in tests/integration/test_runtime_builtin_python.py."""

from __future__ import annotations

from pathlib import Path

from kiln.domain.session_editors import editor_process
from kiln.runtimes.base import WorkloadSpec
from kiln.runtimes.catalog import KILN_ENV_DIR
from kiln.runtimes.local import sandbox
from kiln.runtimes.local.builtin import PythonFacts, plan_python_env, rewrite_script
from kiln.runtimes.local.sandbox import HostFacts, Mount, builtin_mounts

FACTS = HostFacts(
    top_level={"usr": "dir", "bin": "symlink:usr/bin"},
    etc_entries=frozenset({"passwd", "ssl", "profile"}),
    python_prefixes=("/root/.pyenv/versions/3.11.7",),
)
VENV = "/srv/apps/kiln/.venv"
PYTHON = PythonFacts(
    executable="/root/.pyenv/versions/3.11.7/bin/python3.11",
    version="3.11.7",
    scripts_dir=f"{VENV}/bin",
    script_pythons=(f"{VENV}/bin/python", f"{VENV}/bin/python3", f"{VENV}/bin/python3.11"),
)


def test_kilns_environment_is_shown_at_a_fixed_path_with_the_runtimes_bin_over_it() -> None:
    facts = HostFacts(
        FACTS.top_level, FACTS.etc_entries, FACTS.python_prefixes, VENV, "/state/.builtin/ab"
    )
    mounts = builtin_mounts(facts)
    assert Mount("ro-bind", KILN_ENV_DIR, VENV) in mounts
    overlays = mounts[mounts.index(Mount("ro-bind", KILN_ENV_DIR, VENV)) + 1 :]
    assert overlays[:2] == [
        Mount("ro-bind", f"{KILN_ENV_DIR}/bin", "/state/.builtin/ab/bin"),
        Mount("ro-bind", f"{KILN_ENV_DIR}/pyvenv.cfg", "/state/.builtin/ab/pyvenv.cfg"),
    ]
    assert not any(m.dest.startswith(("/srv", "/state")) for m in mounts)
    assert sandbox.path_dirs_for(facts) == ["/opt/kiln/bin"]


def test_without_a_kiln_environment_the_runtime_brings_its_own() -> None:
    facts = HostFacts(FACTS.top_level, FACTS.etc_entries, ("/usr",), None, "/state/.builtin/cd")
    assert Mount("ro-bind", KILN_ENV_DIR, "/state/.builtin/cd") in builtin_mounts(facts)
    env = plan_python_env(PythonFacts("/usr/bin/python3.11", "3.11.2"), {}, own_env=True)
    assert env.site_packages == "lib/python3.11/site-packages"
    assert sandbox.path_dirs_for(facts) == ["/opt/kiln/bin"]


def test_path_never_names_a_host_directory() -> None:
    facts = HostFacts(FACTS.top_level, FACTS.etc_entries, FACTS.python_prefixes, VENV, "/s/x")
    spec = WorkloadSpec(id="job-1", project_dir=Path("/p"), command=("python3", "main.py"))
    path = sandbox.base_env(spec, sandbox.path_dirs_for(facts))["PATH"]
    assert path == "/opt/kiln/bin:/usr/local/bin:/usr/bin:/bin"


def test_the_environment_names_python_python3_and_pip_inside_the_sandbox() -> None:
    scripts = {
        "pip": f"#!{VENV}/bin/python3\nimport sys\nfrom pip._internal import main\n".encode(),
        "jupyter-lab": f"#!{VENV}/bin/python\nfrom jupyterlab.labapp import main\n".encode(),
        "activate": f"VIRTUAL_ENV={VENV}\n".encode(),
        "ruff": b"\x7fELF...",
        "other-tool": b"#!/usr/bin/env node\nconsole.log(1)\n",
    }
    env = plan_python_env(PYTHON, scripts, own_env=False)
    assert dict(env.links) == dict.fromkeys(("python", "python3", "python3.11"), PYTHON.executable)
    assert env.scripts["pip"].startswith(b"#!/opt/kiln/bin/python3\nimport sys\n")
    assert env.scripts["jupyter-lab"].startswith(b"#!/opt/kiln/bin/python\n")
    assert set(env.scripts) == {"pip", "jupyter-lab"}
    assert "home = /root/.pyenv/versions/3.11.7/bin\n" in env.pyvenv_cfg
    assert "include-system-site-packages = true\n" in env.pyvenv_cfg  # pip --user works
    assert env.site_packages == ""
    # Same inputs, same directory (a restarted runner reuses it); other inputs, another one.
    assert env.digest() == plan_python_env(PYTHON, scripts, own_env=False).digest()
    assert env.digest() != plan_python_env(PYTHON, {"pip": scripts["pip"]}, False).digest()


def test_scripts_are_rewritten_only_when_they_run_on_that_python() -> None:
    pythons = PYTHON.script_pythons
    assert rewrite_script(f"#!{VENV}/bin/python3 -E\nx\n".encode(), pythons) == (
        b"#!/opt/kiln/bin/python3 -E\nx\n"
    )
    long_form = f"#!/bin/sh\n'''exec' {VENV}/bin/python3 \"$0\" \"$@\"\n' '''\nimport x\n"
    assert rewrite_script(long_form.encode(), pythons) == (
        b"#!/bin/sh\n'''exec' /opt/kiln/bin/python3 \"$0\" \"$@\"\n' '''\nimport x\n"
    )
    assert rewrite_script(b"#!/usr/bin/python3\n", pythons) is None
    assert rewrite_script(f"#!{VENV}/bin/python3-config\n".encode(), pythons) is None
    assert rewrite_script(b"no shebang", pythons) is None


def test_login_shells_keep_the_workloads_path() -> None:
    spec = WorkloadSpec(id="s-1", project_dir=Path("/p"), command=("sleep", "infinity"))
    profile = sandbox.generated_files(spec, egress=False)["/etc/profile"].decode()
    assert "PATH" not in profile.replace("PATH and the rest", "")
    assert ". /etc/bash.bashrc" in profile and "/etc/profile.d/*.sh" in profile
    assert not any(m.dest == "/etc/profile" for m in builtin_mounts(FACTS)), "host's not bound"


def test_jupyterlab_is_the_one_on_the_runtimes_path() -> None:
    """An image runtime and the built-in one start it the same way: from PATH."""
    assert editor_process("jupyterlab").command[4] == "jupyter-lab"
    assert editor_process("terminal").command == ()
    assert editor_process("jupyterlab").port == 8888
