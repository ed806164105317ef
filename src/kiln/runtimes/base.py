"""The seam between Kiln's runner and whatever actually runs people's code.

A *workload* is (runtime root filesystem, project files at ``/home/cdsw``, command, resources,
environment, network policy). Sessions, job runs, model replicas, applications, builds and
workers are all workloads; the runner never cares which runtime runs them.

``WorkloadRuntime`` is deliberately small (JupyterHub's ``Spawner`` is the model):

- ``start(spec)`` returns where the workload listens (or ``None``);
- ``poll(id)`` returns ``None`` while it runs and its exit status afterwards;
- ``stop``, ``logs``, ``exec`` for terminals;
- ``get_state``/``load_state`` carry an opaque JSON blob the runner stores and never reads, so a
  restarted runner re-attaches to workloads that kept running while it was down, and a new
  runtime needs no schema migration.

A subclass that forgets one of the abstract methods cannot be instantiated, and one that is
registered under a name is checked when it is registered (at import), not at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, TypeVar

SANDBOX_HOME = "/home/cdsw"
# Caches and tools' own state go to the workload's private /tmp, not into the project (HOME):
# there they would show up in the file browser, in downloads and as untracked files in git.
# What a user installs (``pip install`` -> ~/.local) stays in the project; so do dotfiles a
# user writes on purpose. A workload's own ``env`` can still point any of these elsewhere.
TOOL_STATE_ENV = {
    "XDG_CACHE_HOME": "/tmp/.cache",  # noqa: S108  most tools' caches
    "PIP_CACHE_DIR": "/tmp/.cache/pip",  # noqa: S108
    "NPM_CONFIG_CACHE": "/tmp/.npm",  # noqa: S108  npm's cache and its debug logs
    "IPYTHONDIR": "/tmp/.ipython",  # noqa: S108  IPython's profile and history
    "JUPYTER_CONFIG_DIR": "/tmp/.jupyter",  # noqa: S108  JupyterLab's settings, workspaces
    "JUPYTER_DATA_DIR": "/tmp/.jupyter-data",  # noqa: S108  notebook signatures and the like
    "JUPYTER_RUNTIME_DIR": "/tmp/.jupyter-runtime",  # noqa: S108  kernel connection files
    "MPLCONFIGDIR": "/tmp/.matplotlib",  # noqa: S108  matplotlib's font cache
    "HISTFILE": "/tmp/.bash_history",  # noqa: S108  a terminal's shell history
}
"""Where the project's files appear inside every workload (CML's path)."""

_WORKLOAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WorkloadRuntimeError(Exception):
    """Base of the runtime's own errors (named so it never shadows the builtin)."""


class WorkloadNotFound(WorkloadRuntimeError, LookupError):
    """The runtime knows no workload with this id (never started here, or removed)."""


class WorkloadExists(WorkloadRuntimeError):
    """``start`` was called with an id that is already running or recorded."""


class StartFailed(WorkloadRuntimeError):
    """The sandbox could not be created; ``detail`` says why in words a user can act on."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class RuntimeUnavailable(WorkloadRuntimeError):
    """The host lacks something this runtime needs (a binary, a kernel feature)."""


class ExitReason(StrEnum):
    """Machine-readable reason a workload ended (matches the runner's ``reason`` field)."""

    EXITED = "exited"  # the command exited (or died of a signal) on its own
    STOPPED = "stopped"  # ``stop()`` was asked for
    OUT_OF_MEMORY = "oom"  # the kernel killed it for exceeding its memory limit
    LOST = "lost"  # the sandbox vanished without recording how it ended


@dataclass(frozen=True)
class EgressRule:
    """One destination: an IPv4 network and optionally a single TCP/UDP port."""

    network: ipaddress.IPv4Network
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> EgressRule:
        """``"192.0.2.7"``, ``"10.0.0.0/8"``, ``"192.0.2.7:443"``, ``"10.0.0.0/8:5432"``."""
        address, sep, port_text = text.strip().rpartition(":")
        if not sep:
            address, port_text = port_text, ""
        try:
            network = ipaddress.IPv4Network(address, strict=False)
        except ValueError as exc:
            raise ValueError(f"egress rule {text!r}: {exc}") from None
        port: int | None = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"egress rule {text!r}: port must be 1-65535")
            port = int(port_text)
        return cls(network, port)

    def __str__(self) -> str:
        net = (
            str(self.network.network_address) if self.network.prefixlen == 32 else str(self.network)
        )
        return net if self.port is None else f"{net}:{self.port}"


@dataclass(frozen=True)
class NetworkPolicy:
    """What a workload may connect to. The host itself is never reachable unless allowed.

    - ``egress``: outbound connections to addresses that are not the host's own (the LAN, the
      internet) are allowed, except those matching ``deny``.
    - ``allow``: destinations reachable even though they are the host's own addresses or
      ``egress`` is off (for example the web tier's public address, for ``CDSW_API_URL``).
    - ``deny``: destinations never reachable (a cluster's database, cloud metadata).
    - ``host_ports``: TCP ports of the host's loopback the workload may reach, and nothing
      else there: the web tier's public HTTPS port, so a session can call the Kiln API
      (``CDSW_API_URL``, the Workers API). The runtime decides at which address the
      workload sees them (``local``: the slirp gateway, 10.0.2.2).
    Every other port of the host's loopback (where Kiln's gRPC and database listeners live)
    is unreachable in every case: the workload has its own network namespace.
    """

    egress: bool = False
    allow: tuple[EgressRule, ...] = ()
    deny: tuple[EgressRule, ...] = ()
    host_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not all(isinstance(p, int) and 1 <= p <= 65535 for p in self.host_ports):
            raise ValueError(f"host_ports must be TCP ports 1-65535: {self.host_ports!r}")

    @classmethod
    def of(
        cls,
        egress: bool = False,
        allow: tuple[str, ...] = (),
        deny: tuple[str, ...] = (),
        host_ports: tuple[int, ...] = (),
    ) -> NetworkPolicy:
        return cls(
            egress,
            tuple(EgressRule.parse(a) for a in allow),
            tuple(EgressRule.parse(d) for d in deny),
            tuple(host_ports),
        )

    @property
    def wants_network(self) -> bool:
        """Whether the workload needs a network beyond its own loopback."""
        return self.egress or bool(self.allow) or bool(self.host_ports)

    def to_json(self) -> dict[str, Any]:
        return {
            "egress": self.egress,
            "allow": [str(r) for r in self.allow],
            "deny": [str(r) for r in self.deny],
            "host_ports": list(self.host_ports),
        }


@dataclass(frozen=True)
class Placement:
    """Where a workload belongs, for runtimes that place workloads by owner (``kubernetes``:
    the namespace ``kiln-u-{user}`` or ``kiln-t-{team}``, the project's volume claim, the
    image to pull). The runner fills it in; the local runtime ignores it."""

    tenant_kind: str = "user"  # "user": the user's own namespace; "team": a team project's
    tenant: str = ""  # the username or team name, as Kiln spells it
    project_id: int = 0
    kind: str = "workload"  # session, job-run, model-replica, application, build, worker
    image: str = ""  # an OCI reference the cluster pulls; "" = the runtime's default image


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything a runtime needs to start one workload. Pure data; validated by ``check``."""

    id: str
    project_dir: Path  # host path, mounted read-write at /home/cdsw
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cpu: float = 1.0  # vCPU, fractional allowed
    memory_bytes: int = 2 * 1024**3
    pids_max: int = 1024
    port: int | None = None  # declared port inside the sandbox the web tier may reach
    # More declared ports (a session's CDSW_APP_PORT and CDSW_READONLY_PORT): reachable like
    # ``port``, each at its own endpoint (``WorkloadStatus.port_endpoints``).
    extra_ports: tuple[int, ...] = ()
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    log_max_bytes: int = 16 * 1024**2  # console output kept per run; the rest is discarded
    runtime_root: Path | None = None  # unpacked OCI root filesystem; None = built-in runtime
    # False: /home/cdsw is the image's own (read-only), not the project's files. A model
    # replica runs exactly the code its image was built with. Needs ``runtime_root``.
    project_mount: bool = True
    working_dir: str = SANDBOX_HOME
    # Extra host directories shown read-only inside: (host path, sandbox path).
    readonly_binds: tuple[tuple[Path, str], ...] = ()
    # Extra host paths bound read-write: (host path, sandbox path). Bind a *file* (a build's
    # output) together with ``max_file_bytes`` and the workload can grow nothing else on the
    # host's disk.
    writable_binds: tuple[tuple[Path, str], ...] = ()
    # Private in-memory directories of a bounded size, (sandbox path, bytes), gone with the
    # workload. One at /home/cdsw replaces the project bind, one at /tmp the default /tmp.
    # Their pages count against the memory limit: size them below it.
    tmpfs: tuple[tuple[str, int], ...] = ()
    # Largest file the workload may write anywhere (RLIMIT_FSIZE: a write beyond it fails
    # with EFBIG); None: no limit.
    max_file_bytes: int | None = None
    placement: Placement | None = None  # for runtimes that place by owner (see Placement)

    @property
    def home_is_scratch(self) -> bool:
        """A sized scratch directory at /home/cdsw hides whatever else would be there (the
        project, the image's own home): a build's install works in one."""
        return SANDBOX_HOME in dict(self.tmpfs)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field that no runtime could honour."""
        if not _WORKLOAD_ID.match(self.id):
            raise ValueError(
                f"workload id {self.id!r}: 1-64 characters of letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        if not self.command or any("\0" in a for a in self.command):
            raise ValueError("command must be a non-empty argv without NUL bytes")
        if not self.project_dir.is_absolute():
            raise ValueError(f"project_dir must be absolute: {self.project_dir}")
        if not 0 < self.cpu <= 1024:
            raise ValueError(f"cpu must be in (0, 1024], got {self.cpu}")
        if self.memory_bytes < 16 * 1024**2:
            raise ValueError("memory_bytes must be at least 16 MiB")
        if not 8 <= self.pids_max <= 4_194_304:
            raise ValueError("pids_max must be in [8, 4194304]")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError("port must be 1-65535")
        declared = [p for p in (self.port, *self.extra_ports) if p is not None]
        if not all(1 <= p <= 65535 for p in declared) or len(set(declared)) != len(declared):
            raise ValueError("extra_ports must be distinct ports 1-65535, other than port")
        if self.log_max_bytes < 0:
            raise ValueError("log_max_bytes must be >= 0")
        for key, value in self.env.items():
            if not _ENV_NAME.match(key) or "\0" in value:
                raise ValueError(
                    f"environment variable {key!r}: names are letters, digits and '_' "
                    "(not starting with a digit); values contain no NUL byte"
                )
        binds = (*self.readonly_binds, *self.writable_binds)
        dests = [*(dest for _, dest in binds), *(dest for dest, _ in self.tmpfs)]
        for path in (self.working_dir, *dests):
            if not path.startswith("/") or "\0" in path or "/../" in f"{path}/":
                raise ValueError(f"sandbox path {path!r} must be absolute, without '..'")
        for source, _ in binds:
            if not source.is_absolute():
                raise ValueError(f"bind source {source} must be absolute")
        for dest, size in self.tmpfs:
            if dest == "/" or size < 1024**2:
                raise ValueError(f"tmpfs {dest!r}: not the root, and at least 1 MiB")
        if not self.project_mount and self.runtime_root is None and not self._pulls_image():
            raise ValueError(
                "project_mount=False needs an image (runtime_root, or a placement's image to "
                "pull) to hold /home/cdsw"
            )
        if self.max_file_bytes is not None and self.max_file_bytes < 1024**2:
            raise ValueError("max_file_bytes must be at least 1 MiB")

    def _pulls_image(self) -> bool:
        """A runtime that places workloads (``kubernetes``) runs the image it pulls."""
        return self.placement is not None and bool(self.placement.image)


@dataclass(frozen=True)
class Endpoint:
    """Where the web tier reaches a workload's declared port."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class WorkloadStatus:
    """What the runtime knows about one workload. ``exit_code`` is None while it runs."""

    id: str
    running: bool
    exit_code: int | None = None
    reason: ExitReason | None = None
    message: str = ""
    endpoint: Endpoint | None = None
    # Every declared port (``port`` and ``extra_ports``) -> where the web tier reaches it,
    # while the workload runs.
    port_endpoints: Mapping[int, Endpoint] = field(default_factory=dict)
    started_at: float | None = None  # Unix time
    finished_at: float | None = None
    log_bytes: int = 0
    log_truncated: bool = False
    # Memory its processes use now, while it runs (None: this runtime cannot tell).
    memory_used_bytes: int | None = None
    # What the runtime went through to start it, with times (Unix): for the timeline.
    # ``kubernetes``: scheduled on a node, image pulled, container started, ready.
    steps: tuple[tuple[float, str], ...] = ()


class ExecProcess(ABC):
    """An interactive process inside a running workload (a terminal, ``kubectl exec``-like).

    With a TTY, output is the terminal's (stdout and stderr together) and ``resize`` changes
    its window size; without one, stdout and stderr are merged into one stream too.
    """

    @abstractmethod
    def read(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Next output bytes; ``b""`` at end of output. ``timeout`` → ``TimeoutError``."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send bytes to its stdin (keystrokes, for a TTY)."""

    @abstractmethod
    def close_stdin(self) -> None:
        """End of input (a TTY gets ^D)."""

    @abstractmethod
    def resize(self, rows: int, cols: int) -> None:
        """New terminal size; ignored without a TTY."""

    @abstractmethod
    def poll(self) -> int | None:
        """Exit status, or None while it runs (same convention as ``WorkloadRuntime.poll``)."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int:
        """Block until it exits; ``TimeoutError`` after ``timeout`` seconds."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL it (and whatever it started in its session)."""

    @abstractmethod
    def close(self) -> None:
        """Release the handle's file descriptors; kills the process if it still runs."""

    def __enter__(self) -> ExecProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkloadRuntime(ABC):
    """Runs workloads. One instance serves many workloads; all methods are thread-safe.

    Exit statuses follow the shell's (and Kubernetes') convention rather than Popen's: a
    command that exits reports its code (0-255) and one killed by signal N reports 128+N —
    never a negative number — because a sandbox's init relays its child's status that way.
    """

    name: ClassVar[str]

    def add_exit_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(workload_id)`` each time a workload ends (from the runtime's own
        thread: keep it short). The runner uses it to record endings at once, not at its next
        poll."""
        self.__dict__.setdefault("_exit_listeners", []).append(listener)

    def notify_exit(self, workload_id: str) -> None:
        """For implementations: tell the listeners that ``workload_id`` ended."""
        for listener in self.__dict__.get("_exit_listeners", ()):
            try:
                listener(workload_id)
            except Exception:  # a listener's bug must not break the runtime's bookkeeping
                logging.getLogger("kiln.runtimes").exception("exit listener failed")

    @abstractmethod
    def start(self, spec: WorkloadSpec) -> Endpoint | None:
        """Create the sandbox and start ``spec.command`` in it.

        Returns once the command is running (not once it is *ready*: readiness is the
        caller's probe). Returns the endpoint of ``spec.port`` or None when none is declared.
        Raises ``WorkloadExists`` for a known id, ``ValueError`` for an invalid spec and
        ``StartFailed`` when the sandbox cannot be created (nothing is left behind then).
        """

    @abstractmethod
    def stop(self, workload_id: str, grace: float = 10.0) -> None:
        """SIGTERM the workload's processes, SIGKILL whatever is left after ``grace`` seconds.

        Blocks until it has exited. Stopping a workload that already ended does nothing.
        """

    def poll(self, workload_id: str) -> int | None:
        """``None`` while the workload runs, its exit status once it has ended.

        Before ``start`` (an id this runtime has never seen, or one removed) it raises
        ``WorkloadNotFound`` — there is nothing to poll. While ``start`` is still creating the
        sandbox (called from another thread) it returns ``None``: the workload exists and has
        not ended. After a ``load_state`` it reports the re-attached workload the same way.
        """
        return self.status(workload_id).exit_code

    @abstractmethod
    def status(self, workload_id: str) -> WorkloadStatus:
        """Everything known about the workload (``WorkloadNotFound`` if unknown)."""

    def append_log(self, workload_id: str, data: bytes) -> None:
        """Add ``data`` to the workload's console log, as if the workload had printed it:
        what its interactive terminals showed, so a session's console is kept after it ends.
        Same cap as the workload's own output. Runtimes that cannot may ignore it."""
        return None  # this default keeps nothing

    @abstractmethod
    def logs(self, workload_id: str, since: int = 0, follow: bool = False) -> Iterator[bytes]:
        """Console output (stdout and stderr, interleaved as written) from byte ``since``.

        Without ``follow`` it yields what is stored now; with ``follow`` it keeps yielding as
        the workload writes and returns once the workload has ended and all output is read.
        Output is kept after the workload ends, until ``remove``.
        """

    @abstractmethod
    def exec(
        self,
        workload_id: str,
        argv: list[str],
        tty: bool = False,
        env: Mapping[str, str] | None = None,
        rows: int = 24,
        cols: int = 80,
    ) -> ExecProcess:
        """Start ``argv`` inside the running workload, as its user, in its working directory,
        with its environment plus ``env``, under its resource limits."""

    @abstractmethod
    def get_state(self, workload_id: str) -> dict[str, Any]:
        """Opaque JSON-serialisable state that lets another instance re-attach."""

    @abstractmethod
    def load_state(self, state: Mapping[str, Any]) -> None:
        """Re-attach to a workload described by ``get_state`` of a previous instance.

        Afterwards ``poll``/``status``/``logs``/``stop``/``exec`` work as if this instance had
        started it; one that ended meanwhile reports its exit status and reason.
        """

    @abstractmethod
    def list_workloads(self) -> list[str]:
        """Ids of every workload this instance knows (running or ended, not yet removed)."""

    @abstractmethod
    def remove(self, workload_id: str) -> None:
        """Forget an ended workload and delete what the runtime kept for it (its logs too)."""

    def close(self) -> None:  # noqa: B027  (optional hook; most runtimes have nothing to do)
        """Stop this instance's background work. Running workloads are left running."""

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_R = TypeVar("_R", bound=WorkloadRuntime)

_REGISTRY: dict[str, type[WorkloadRuntime]] = {}


def register_runtime(name: str) -> Any:
    """Class decorator: make a runtime available by its short name (``"local"``)."""

    def decorate(cls: type[_R]) -> type[_R]:
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"runtime {name!r} ({cls.__name__}) does not implement {missing}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a runtime named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def runtime_class(name: str) -> type[WorkloadRuntime]:
    """The runtime registered under ``name``; importing built-ins on first use."""
    if name not in _REGISTRY:
        import kiln.runtimes.local
    if name == "kubernetes" and name not in _REGISTRY:
        import kiln.runtimes.kubernetes  # noqa: F401  (registers "kubernetes")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LookupError(f"no runtime named {name!r}; known: {sorted(_REGISTRY)}") from None


def runtime_names() -> list[str]:
    runtime_class("local")
    runtime_class("kubernetes")
    return sorted(_REGISTRY)
