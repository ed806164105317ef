"""One source-to-image build, step by step: snapshot → base → dependencies → code → push.

``run_build`` is pure mechanism: it takes a ``BuildSpec`` (what to build), the ``ImageTarget``
(where to), a ``WorkloadRuntime`` (where the install runs) and a ``BuildObserver`` (where
the log and the step timeline go, and whether to stop), and returns the digests. The
builder service wraps it with the database (queue, state, dependency cache); the benchmark
and the tests call it the same way.

What Kiln does with each input (nothing a workload wrote is opened, parsed or executed with
more privilege than the workload has):

- the project tree and ``.git``: only git reads them, sandboxed as the workload uid
  (``snapshot.py``); ``git archive`` makes the code layer; Kiln hashes and compresses it;
- ``requirements.txt`` and ``cdsw-build.sh``: their bytes (from ``git cat-file``) are
  hashed for the cache key and never interpreted here; they run inside the sandbox;
- what the install writes: only inside the sandbox, which turns ``/opt/kiln/deps`` into a
  reproducible tar; Kiln hashes and compresses those bytes, nothing more;
- the log: stored and shown as text, never interpreted.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kiln.build import deps, pod_install, snapshot
from kiln.build.bases import Base, BaseUnavailable
from kiln.build.layers import (
    CONFIG,
    MANIFEST,
    Layer,
    LayerTooLarge,
    canonical_json,
    compress_file,
    compress_layer,
    image_manifest,
    json_blob,
)
from kiln.build.registry_client import Reference, RegistryError
from kiln.build.serving_layer import MODEL_PORT, serving_tar
from kiln.build.target import ImageTarget
from kiln.domain.errors import KilnError
from kiln.runtimes.base import StartFailed, WorkloadRuntime
from kiln.runtimes.catalog import resolve_in_root

STEPS = ("snapshot", "base", "dependencies", "code", "push")
WORKING_DIR = "/home/cdsw"
DEFAULT_COMMAND = ("python3",)


class BuildFailed(Exception):
    """The build cannot succeed; ``reason`` is for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BuildStopped(Exception):
    """Cancelled, or out of time (``timed_out``)."""

    def __init__(self, timed_out: bool, reason: str) -> None:
        super().__init__(reason)
        self.timed_out = timed_out
        self.reason = reason


@dataclass(frozen=True)
class BuildSpec:
    build_id: str  # the build's workload id: refs, sandbox ids
    attempt: int
    number: int
    project: str  # "alice/demo"
    project_dir: Path
    repository: str  # where the image goes, e.g. "alice/demo/build"
    tags: tuple[str, ...]
    base: Reference
    commit: str | None = None  # None: the working tree
    no_cache: bool = False
    env: Mapping[str, str] = field(default_factory=dict)  # the project's, for the install
    command: tuple[str, ...] = DEFAULT_COMMAND
    timeout_seconds: float = 1800.0
    max_file_bytes: int = 50 * 1024**2
    limits: deps.SandboxLimits = field(default_factory=deps.SandboxLimits)
    pip_env: Mapping[str, str] = field(default_factory=dict)  # the site's pip settings
    serving: bool = False  # a model's image: the model server's layer goes in too
    # Where workloads are pods: the install runs as a pod there (``pod_install``), not in
    # a sandbox of the builder's runtime.
    pod: pod_install.PodTarget | None = None

    @property
    def label(self) -> str:
        return f"{self.project}#{self.number}"


@dataclass(frozen=True)
class CachedLayer:
    layer: Layer
    repository: str


class DependencyCache(Protocol):
    def lookup(self, key: str) -> CachedLayer | None: ...

    def store(self, key: str, layer: Layer, repository: str) -> None: ...


class BuildObserver(Protocol):
    """Where a running build reports (the builder: the DB and the log file)."""

    def log(self, data: bytes) -> None: ...

    def step(self, name: str, status: str, detail: str = "") -> None:
        """``status``: running, done, cached, skipped, failed."""

    def should_stop(self) -> bool: ...

    def sandbox_started(self, workload_id: str) -> None: ...


@dataclass
class BuildResult:
    snapshot: snapshot.Snapshot
    base_digest: str
    dependency_key: str | None
    dependencies: Layer | None
    dependencies_cached: bool
    code: Layer
    serving: Layer | None
    config_digest: str
    manifest_digest: str
    repository: str
    tags: tuple[str, ...]

    def layers_json(self) -> dict[str, Any]:
        return {
            "dependencies": self.dependencies.to_json() if self.dependencies else None,
            "code": self.code.to_json(),
            **({"serving": self.serving.to_json()} if self.serving else {}),
        }


def _iso(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_config(
    spec: BuildSpec, base: Base, snap: snapshot.Snapshot, layers: list[Layer], how: str
) -> dict[str, Any]:
    """The base's config with the build's layers, environment, working dir, command and
    labels. Everything but the ``io.kiln.build`` label is a function of the inputs."""
    base_config = base.config.get("config") or {}
    env = dict(base.env)
    env["PATH"] = f"{deps.DEPS_PREFIX}/bin:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
    # The user site: Python puts it on sys.path (after the standard library, .pth files
    # honoured), which PYTHONPATH would not do as well.
    env["PYTHONUSERBASE"] = deps.DEPS_PREFIX
    created = _iso(snap.time)
    labels = dict(base_config.get("Labels") or {})
    labels.update(
        {
            "io.kiln.project": spec.project,
            "io.kiln.commit": snap.commit,
            "io.kiln.build": spec.label,
            "org.opencontainers.image.revision": snap.commit,
        }
    )
    config: dict[str, Any] = {
        key: base_config[key]
        for key in ("User", "ExposedPorts", "Volumes", "StopSignal")
        if key in base_config
    }
    config.update(
        {
            "Env": [f"{k}={v}" for k, v in env.items()],
            "WorkingDir": WORKING_DIR,
            "Cmd": list(spec.command),
            "Labels": labels,
        }
    )
    history = list(base.config.get("history") or [])
    if len(layers) - spec.serving == 2:
        history.append({"created": created, "created_by": f"kiln: dependencies ({how})"})
    if spec.serving:
        history.append({"created": created, "created_by": "kiln: model server"})
        config["ExposedPorts"] = {**config.get("ExposedPorts", {}), f"{MODEL_PORT}/tcp": {}}
    history.append({"created": created, "created_by": f"kiln: project snapshot {snap.commit}"})
    return {
        "architecture": base.config.get("architecture", "amd64"),
        "os": base.config.get("os", "linux"),
        "created": created,
        "config": config,
        "rootfs": {
            "type": "layers",
            "diff_ids": [layer.diff_id for layer in (*base.layers, *layers)],
        },
        "history": history,
    }


class _Run:
    def __init__(
        self,
        spec: BuildSpec,
        target: ImageTarget,
        runtime: WorkloadRuntime,
        observer: BuildObserver,
        cache: DependencyCache,
        work: Path,
        base: Callable[[Reference, Callable[[str], None]], Base],
    ) -> None:
        self.spec, self.target, self.runtime = spec, target, runtime
        self.observer, self.cache, self.work = observer, cache, work
        self.resolve_base = base
        self.deadline = time.time() + spec.timeout_seconds

    def say(self, text: str) -> None:
        self.observer.log(f"==> {text}\n".encode())

    def check(self) -> None:
        if self.observer.should_stop():
            raise BuildStopped(False, "cancelled")
        if time.time() > self.deadline:
            raise self.timed_out()

    def timed_out(self) -> BuildStopped:
        minutes = self.spec.timeout_seconds / 60
        return BuildStopped(True, f"ran longer than the build time limit ({minutes:g} min)")

    def step(self, name: str, action: Callable[[], tuple[str, str]]) -> None:
        """Run one step: ``action`` returns (status, detail); its duration is recorded."""
        self.check()
        self.observer.step(name, "running")
        started = time.monotonic()
        try:
            status, detail = action()
        except BaseException as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "detail", None) or str(exc)
            self.observer.step(name, "failed", str(reason)[:500])
            raise
        self.say(f"{name}: {detail} ({time.monotonic() - started:.1f} s)")
        self.observer.step(name, status, detail)

    # ---------------------------------------------------------------- steps

    def take_snapshot(self) -> tuple[str, str]:
        spec = self.spec
        self.snap = snapshot.take_snapshot(
            spec.project_dir, spec.build_id, commit=spec.commit, max_file_bytes=spec.max_file_bytes
        )
        contents = snapshot.read_snapshot(spec.project_dir, self.snap)
        self.files, self.code_tar = contents.dependencies, contents.code_tar
        what = "the working tree" if self.snap.from_working_tree else f"commit {spec.commit}"
        return "done", (
            f"{what} as commit {self.snap.commit[:12]}: {self.snap.files} files, "
            f"{self.snap.size / 1024**2:.1f} MiB"
        )

    def find_base(self) -> tuple[str, str]:
        self.base = self.resolve_base(self.spec.base, self.say)
        return "done", f"{self.spec.base} ({self.base.manifest_digest[:19]})"

    def dependencies(self) -> tuple[str, str]:
        spec = self.spec
        self.deps_layer: Layer | None = None
        self.deps_cached = False
        self.how = (
            "cdsw-build.sh"
            if "cdsw-build.sh" in self.files
            else "requirements.txt"
            if "requirements.txt" in self.files
            else ""
        )
        env = {**spec.env, **spec.pip_env}
        self.key: str | None = None
        if not self.how:
            return "skipped", "no cdsw-build.sh or requirements.txt"
        self.key = deps.dependency_key(self.base.manifest_digest, self.files, self.snap.tree, env)
        if not spec.no_cache:
            cached = self.cache.lookup(self.key)
            if cached is not None and self._reuse(cached):
                self.deps_layer, self.deps_cached = cached.layer, True
                return "cached", f"{self.how} unchanged: reused {cached.layer.digest[:19]}"
        self._install(env)
        assert self.deps_layer is not None
        size = self.deps_layer.size / 1024**2
        return "done", f"installed from {self.how}: {size:.1f} MiB compressed"

    def _reuse(self, cached: CachedLayer) -> bool:
        try:
            placed = self.target.place_blob(
                self.spec.repository, cached.layer, sources=[cached.repository]
            )
        except RegistryError:
            return False  # gone from the registry (garbage-collected): install again
        return placed in ("present", "mounted")

    def _install(self, env: Mapping[str, str]) -> None:
        spec = self.spec
        home = max(256 * 1024**2, 2 * len(self.code_tar) + 64 * 1024**2)
        environment = deps.build_environment(self.base.env, env, self.deadline)
        workload_id = f"build-{spec.build_id}-{spec.attempt}"
        try:
            if spec.pod is None:
                self._install_in_sandbox(workload_id, environment, home)
            else:
                self._install_in_pod(spec.pod, workload_id, environment, home)
        except deps.InstallStopped:
            raise (
                self.timed_out()
                if time.time() > self.deadline
                else BuildStopped(False, "cancelled")
            ) from None
        except deps.InstallFailed as exc:
            raise BuildFailed(exc.reason) from None
        except StartFailed as exc:
            raise BuildFailed(f"the build sandbox could not start: {exc.detail}") from None
        blob = self.work / "deps.tar.gz"
        try:
            self.deps_layer = compress_file(
                self.work / "out" / "deps.tar",
                blob,
                limit=spec.limits.layer_max_bytes,
            )
        except LayerTooLarge as exc:
            raise BuildFailed(f"the dependency layer is too large: {exc}") from None
        (self.work / "out" / "deps.tar").unlink()
        self.target.place_blob(spec.repository, self.deps_layer, open_path=lambda: blob)
        assert self.key is not None
        self.cache.store(self.key, self.deps_layer, spec.repository)

    def _install_in_sandbox(self, workload_id: str, env: dict[str, str], home: int) -> None:
        # (A pod needs no such directory: its scratch mount there makes the mount point.)
        prefix = self.base.rootfs / deps.DEPS_PREFIX.lstrip("/")
        if resolve_in_root(self.base.rootfs, deps.DEPS_PREFIX) != prefix or not prefix.is_dir():
            raise BuildFailed(
                f"base image {self.spec.base} has no {deps.DEPS_PREFIX} directory, where a "
                f"build installs dependencies; Kiln's base images have one (add `RUN mkdir -p "
                f"{deps.DEPS_PREFIX}` to a runtime image of your own)"
            )
        deps.prepare_workdir(self.work, self.code_tar)
        sandbox = deps.install_spec(
            workload_id, self.work, self.base.rootfs, env, self.spec.limits, home
        )
        deps.run_install(
            self.runtime,
            sandbox,
            deadline=self.deadline,
            log=self.observer.log,
            should_stop=self.observer.should_stop,
            started=self.observer.sandbox_started,
        )

    def _install_in_pod(
        self, where: pod_install.PodTarget, workload_id: str, env: dict[str, str], home: int
    ) -> None:
        placement = where.placement(self.spec.base.repository, self.base.manifest_digest)
        for name in ("out", "home"):
            (self.work / name).mkdir(mode=0o700, exist_ok=True)
        spec = pod_install.install_pod_spec(
            workload_id, self.work / "home", env, self.spec.limits, home, placement
        )
        self.say(f"installing in a pod of {placement.image} (namespace of {where.tenant})")
        pod_install.run_pod_install(
            self.runtime,
            spec,
            self.code_tar,
            self.work / "out" / "deps.tar",
            max_layer_bytes=self.spec.limits.layer_max_bytes,
            deadline=self.deadline,
            log=self.observer.log,
            should_stop=self.observer.should_stop,
            started=self.observer.sandbox_started,
        )

    def code_layer(self) -> tuple[str, str]:
        self.code_blob = self.work / "code.tar.gz"
        with self.code_blob.open("wb") as out:
            self.code = compress_layer([self.code_tar], out)
        detail = f"{self.code.size / 1024:.1f} KiB compressed ({self.code.digest[:19]})"
        self.serving: Layer | None = None
        if self.spec.serving:
            self.serving_blob = self.work / "serving.tar.gz"
            with self.serving_blob.open("wb") as out:
                self.serving = compress_layer([serving_tar()], out)
            detail += f"; model server layer {self.serving.digest[:19]}"
        return "done", detail

    def push(self) -> tuple[str, str]:
        spec = self.spec
        base: dict[str, int] = {}
        for layer in self.base.layers:  # never uploaded: mounted from the base's repository
            placed = self.target.place_blob(spec.repository, layer, sources=[spec.base.repository])
            base[placed] = base.get(placed, 0) + 1
        if self.serving is not None:
            self.target.place_blob(
                spec.repository, self.serving, open_path=lambda: self.serving_blob
            )
        code = self.target.place_blob(spec.repository, self.code, open_path=lambda: self.code_blob)
        layers = [
            layer for layer in (self.deps_layer, self.serving, self.code) if layer is not None
        ]
        config, config_bytes = json_blob(
            image_config(spec, self.base, self.snap, layers, self.how), CONFIG
        )
        config_path = self.work / "config.json"
        config_path.write_bytes(config_bytes)
        self.target.place_blob(spec.repository, config, open_path=lambda: config_path, fresh=True)
        self.config_digest = config.digest
        manifest = canonical_json(image_manifest(config, [*self.base.layers, *layers]))
        for tag in spec.tags:
            self.manifest_digest = self.target.put_manifest(
                spec.repository, tag, manifest, MANIFEST
            )
        reused = ", ".join(f"{n} {how}" for how, n in sorted(base.items()))
        return "done", (
            f"{self.target.host}/{spec.repository}:{spec.tags[0]} "
            f"({self.manifest_digest[:19]}; base layers {reused}, code layer {code})"
        )


def run_build(
    spec: BuildSpec,
    *,
    target: ImageTarget,
    runtime: WorkloadRuntime,
    observer: BuildObserver,
    cache: DependencyCache,
    work: Path,
    resolve_base: Callable[[Reference, Callable[[str], None]], Base],
) -> BuildResult:
    """Run the build; ``BuildFailed``/``BuildStopped`` say why it did not finish. ``work``
    (a private directory) is emptied at the end."""
    run = _Run(spec, target, runtime, observer, cache, work, resolve_base)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        run.step("snapshot", run.take_snapshot)
        run.step("base", run.find_base)
        run.step("dependencies", run.dependencies)
        run.step("code", run.code_layer)
        run.step("push", run.push)
    except (KilnError, BaseUnavailable, RegistryError) as exc:
        raise BuildFailed(getattr(exc, "detail", None) or str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuildResult(
        snapshot=run.snap,
        base_digest=run.base.manifest_digest,
        dependency_key=run.key,
        dependencies=run.deps_layer,
        dependencies_cached=run.deps_cached,
        code=run.code,
        serving=run.serving,
        config_digest=run.config_digest,
        manifest_digest=run.manifest_digest,
        repository=spec.repository,
        tags=spec.tags,
    )
