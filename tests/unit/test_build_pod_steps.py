"""A build's install as a pod: the in-pod steps read and write streams (nothing can be bound
into a pod), and the pod asked for is the sandbox the local runtime gives (sized scratch
directories, no project volume, the base image by digest from the nodes' registry)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from kiln.build import in_sandbox
from kiln.build.deps import DEPS_PREFIX, SCRIPT_IN_SANDBOX, SandboxLimits
from kiln.build.pod_install import PodTarget, install_pod_spec
from kiln.runtimes.kubernetes import manifests
from kiln.runtimes.kubernetes.manifests import ClusterPolicy, PodInput, Tenant

DIGEST = "sha256:" + "ab" * 32


class Pipe(io.RawIOBase):
    """A stream that cannot seek or tell, as a process's stdin and stdout are."""

    def __init__(self, data: bytes = b"") -> None:
        self._in = io.BytesIO(data)
        self.written = bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self._in.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.written += data
        return len(data)


def archive(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_the_snapshot_is_unpacked_from_a_stream_keeping_only_the_project(tmp_path: Path) -> None:
    data = archive(
        {
            "home/cdsw/main.py": b"print(1)\n",
            "home/cdsw/pkg/mod.py": b"X = 2\n",
            "etc/passwd": b"not the project's\n",
        }
    )
    assert in_sandbox.unpack_code(Pipe(data), str(tmp_path)) == 2  # type: ignore[arg-type]
    assert (tmp_path / "main.py").read_bytes() == b"print(1)\n"
    assert (tmp_path / "pkg" / "mod.py").read_bytes() == b"X = 2\n"
    assert not (tmp_path / "etc").exists()


def test_an_entry_escaping_the_home_directory_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    data = archive({"home/cdsw/../../planted": b"x"})
    with pytest.raises(tarfile.FilterError):
        in_sandbox.unpack_code(Pipe(data), str(home))  # type: ignore[arg-type]
    assert not (tmp_path / "planted").exists()


def test_the_layer_written_to_a_pipe_is_the_same_bytes_as_to_a_file(tmp_path: Path) -> None:
    deps = tmp_path / "opt" / "kiln" / "deps"
    (deps / "lib").mkdir(parents=True)
    (deps / "lib" / "a.py").write_text("A = 1\n")
    (deps / "link").symlink_to("lib/a.py")
    pipe = Pipe()
    in_sandbox.write_layer(315532800, pipe, str(deps), str(tmp_path))  # type: ignore[arg-type]
    with (tmp_path / "deps.tar").open("wb") as f:
        in_sandbox.write_layer(315532800, f, str(deps), str(tmp_path))
    assert bytes(pipe.written) == (tmp_path / "deps.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(bytes(pipe.written))) as tar:
        assert tar.getnames()[:3] == ["opt", "opt/kiln", "opt/kiln/deps"]


def test_the_base_image_is_pulled_by_digest_from_the_nodes_registry() -> None:
    target = PodTarget("team", "ml", 7, "registry.kiln.svc:5000")
    placement = target.placement("runtimes/python", DIGEST)
    assert placement.image == f"registry.kiln.svc:5000/runtimes/python@{DIGEST}"
    assert (placement.tenant_kind, placement.tenant, placement.kind) == ("team", "ml", "build")
    assert PodTarget("user", "a", 1).placement("r", DIGEST).image == f"r@{DIGEST}"


def test_the_install_pod_is_the_sandbox_in_pod_form(tmp_path: Path) -> None:
    limits = SandboxLimits(deps_max_bytes=3 * 1024**3, tmp_bytes=1024**3)
    placement = PodTarget("user", "alice", 4, "reg:5000").placement("runtimes/python", DIGEST)
    spec = install_pod_spec(
        "build-abc-1", tmp_path, {"PIP_USER": "1"}, limits, 300 * 1024**2, placement
    )
    pod = manifests.pod(
        ClusterPolicy(), PodInput(spec, Tenant("user", "alice"), 4, placement.image, "build")
    )
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python3", SCRIPT_IN_SANDBOX, "hold"]
    assert container["image"] == f"reg:5000/runtimes/python@{DIGEST}"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[DEPS_PREFIX]["emptyDir"] == {"medium": "Memory", "sizeLimit": str(3 * 1024**3)}
    assert mounts["/tmp"]["emptyDir"]["sizeLimit"] == str(1024**3)
    assert mounts["/home/cdsw"]["emptyDir"]["sizeLimit"] == str(300 * 1024**2)
    assert not any("persistentVolumeClaim" in v for v in volumes.values())  # no project
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["namespace"] == "kiln-u-alice"
