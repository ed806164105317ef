"""The built-in runtime's JupyterLab: Kiln's own environment is shown read-only at a fixed
path inside sandboxes (never the host's layout), and JupyterLab runs from there; an image's
JupyterLab is the ``jupyter-lab`` on its PATH."""

from __future__ import annotations

import sys

from kiln.db.workload_models import Runtime
from kiln.domain.session_editors import editor_process
from kiln.runtimes.catalog import KILN_ENV_DIR
from kiln.runtimes.local.sandbox import HostFacts, Mount, builtin_mounts

FACTS = HostFacts(
    top_level={"usr": "dir", "bin": "symlink:usr/bin"},
    etc_entries=frozenset({"passwd", "ssl"}),
    python_prefixes=("/usr",),
)


def test_kilns_environment_is_bound_read_only_at_a_fixed_path() -> None:
    with_env = HostFacts(FACTS.top_level, FACTS.etc_entries, ("/usr",), "/srv/apps/kiln/.venv")
    assert Mount("ro-bind", KILN_ENV_DIR, "/srv/apps/kiln/.venv") in builtin_mounts(with_env)
    assert not any(m.dest == KILN_ENV_DIR for m in builtin_mounts(FACTS))
    assert not any(m.dest.startswith("/srv") for m in builtin_mounts(with_env))


def test_jupyterlab_program_per_runtime() -> None:
    builtin = editor_process("jupyterlab", None).command
    if sys.prefix != sys.base_prefix:
        assert builtin[:3] == (f"{KILN_ENV_DIR}/bin/python", "-m", "jupyterlab")
    image = Runtime(name="img", source="oci-archive", rootfs_path="/cache/rootfs/x", env=[])
    assert editor_process("jupyterlab", image).command[0] == "jupyter-lab"
    assert editor_process("terminal", image).command == ()
    assert editor_process("jupyterlab", image).port == 8888
