"""The pure parts of git smart HTTP: which URL asks for what, the environment and config
``git http-backend`` runs with, its CGI response headers, and the commands of a push.

Nothing here does I/O, so all of it is testable without a server or a repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kiln.domain.authz import Action
from kiln.domain.errors import BadPath, InvalidInput, KilnError, NotFound
from kiln.domain.names import check_slug
from kiln.storage.git import SANDBOX_REPO, git_env

UPLOAD_PACK = "git-upload-pack"
RECEIVE_PACK = "git-receive-pack"
SERVICE_ACTIONS: dict[str, Action] = {UPLOAD_PACK: Action.view, RECEIVE_PACK: Action.write}

# What http-backend forwards to git as GIT_PROTOCOL (e.g. "version=2"); nothing exotic.
_GIT_PROTOCOL = re.compile(r"^[A-Za-z0-9=._:-]{1,100}$")
_HOP_BY_HOP = frozenset({"connection", "transfer-encoding", "keep-alive", "content-length"})
MAX_CGI_HEADER_BYTES = 16 * 1024


class MethodNotAllowed(KilnError):
    status = 405
    title = "Method not allowed"


class UnsupportedMediaType(KilnError):
    status = 415
    title = "Unsupported media type"


@dataclass(frozen=True)
class GitRoute:
    """One smart-HTTP request: ``advertise`` is ``GET info/refs?service=…``, otherwise it is
    the ``POST`` of the service's request."""

    owner: str
    slug: str
    service: str
    advertise: bool

    @property
    def action(self) -> Action:
        return SERVICE_ACTIONS[self.service]

    @property
    def is_push(self) -> bool:
        return self.service == RECEIVE_PACK

    @property
    def backend_path(self) -> str:
        """PATH_INFO below GIT_PROJECT_ROOT; the git dir of the project's working tree."""
        return "/.git/" + ("info/refs" if self.advertise else self.service)

    @property
    def request_content_type(self) -> str:
        return f"application/x-{self.service}-request"


def parse_route(method: str, tail: str, service_query: str | None) -> GitRoute:
    """``tail`` is the path after ``/git/``: ``{owner}/{project}.git/{info/refs|service}``.

    The ``.git`` suffix is optional, as on other git hosts. Only the smart protocol is
    served: the dumb protocol would hand out raw files of ``.git``.
    """
    parts = tail.split("/")
    if len(parts) < 3:
        raise NotFound(
            "not a git URL: use https://HOST/git/{owner}/{project}.git (clone it with git)"
        )
    owner, repo, rest = parts[0], parts[1], "/".join(parts[2:])
    slug = repo.removesuffix(".git")
    for name in (owner, slug):
        try:
            check_slug(name, "name")
        except InvalidInput as exc:  # no project can have this name, so there is none
            raise NotFound(f"project {owner[:64]!r}/{slug[:64]!r} not found") from exc
    if rest == "info/refs":
        if method != "GET":
            raise MethodNotAllowed("info/refs is read with GET")
        if service_query is None:
            raise BadPath(
                "Kiln serves git over the smart HTTP protocol only; "
                "use git 1.6.6 or later (info/refs needs ?service=)"
            )
        if service_query not in SERVICE_ACTIONS:
            raise BadPath(f"unknown git service {service_query[:40]!r}")
        return GitRoute(owner, slug, service_query, advertise=True)
    if rest in SERVICE_ACTIONS:
        if method != "POST":
            raise MethodNotAllowed(f"{rest} is called with POST")
        return GitRoute(owner, slug, rest, advertise=False)
    raise NotFound(
        f"no such git resource {rest[:80]!r}: Kiln serves info/refs, "
        f"{UPLOAD_PACK} and {RECEIVE_PACK} (smart HTTP)"
    )


def server_config(max_push_bytes: int) -> list[tuple[str, str]]:
    """Configuration every http-backend run gets on its command-line scope, which beats the
    repository's own config (on top of ``kiln.storage.git.SERVER_CONFIG``: no hooks, no
    fsmonitor, HFS/NTFS path protection, no file:// transport). Why each one:

    - every received object is fsck-checked: ``.git`` entries in trees (any case, HFS/NTFS
      spellings), ``..`` path components, submodule names that climb out (``../../hooks``),
      option-like submodule URLs/paths and a symlinked ``.gitmodules`` are all refused;
    - a push to the checked-out branch updates the files (``updateInstead``) and is refused
      with git's own message when the working tree has uncommitted changes;
    - force pushes are refused on every branch: ``main`` carries the file edits that
      collaborators made through the UI and API, and a force push would drop them silently.
      Git cannot scope this to one branch; to rewrite a topic branch, delete it and push it
      again. Deleting branches is allowed, except the checked-out ``main``;
    - git enforces the size limit too (``receive.maxInputSize``), behind Kiln's own count;
    - no dumb-protocol file reads (``http.getanyfile``); partial clones are allowed (useful
      for repositories with large data files), fetching unadvertised objects is not.
    """
    return [
        ("transfer.fsckObjects", "true"),
        ("receive.fsckObjects", "true"),
        ("receive.denyCurrentBranch", "updateInstead"),
        ("receive.denyDeleteCurrent", "refuse"),
        ("receive.denyDeletes", "false"),
        ("receive.denyNonFastForwards", "true"),
        ("receive.advertisePushOptions", "false"),
        ("receive.maxInputSize", str(max_push_bytes)),
        ("http.getanyfile", "false"),
        ("http.uploadpack", "true"),
        ("http.receivepack", "true"),
        ("uploadpack.allowFilter", "true"),
        ("uploadpack.allowTipSHA1InWant", "false"),
        ("uploadpack.allowReachableSHA1InWant", "false"),
        ("uploadpack.allowAnySHA1InWant", "false"),
    ]


def backend_env(
    route: GitRoute,
    *,
    username: str,
    address: str,
    git_protocol: str | None,
    max_push_bytes: int,
) -> dict[str, str]:
    """The CGI environment of one http-backend run, inside the project's git sandbox (where
    the repository is ``/home/cdsw``); the server's settings ride along as ``GIT_CONFIG_*``,
    which every git process http-backend starts inherits.

    No CONTENT_LENGTH: Kiln decodes any gzip itself and streams the body to EOF, so
    http-backend passes its stdin straight to the service instead of buffering it.
    """
    env = {
        "GIT_PROJECT_ROOT": SANDBOX_REPO,
        "PATH_INFO": route.backend_path,
        "REQUEST_METHOD": "GET" if route.advertise else "POST",
        "QUERY_STRING": f"service={route.service}" if route.advertise else "",
        "GIT_HTTP_EXPORT_ALL": "1",
        "REMOTE_USER": username,
        "REMOTE_ADDR": address or "0.0.0.0",  # noqa: S104 - an address, not a bind
    }
    if not route.advertise:
        env["CONTENT_TYPE"] = route.request_content_type
    if git_protocol and _GIT_PROTOCOL.match(git_protocol):
        env["HTTP_GIT_PROTOCOL"] = git_protocol
    return git_env(env, config=server_config(max_push_bytes))


def split_cgi_headers(buffer: bytes) -> tuple[bytes, bytes] | None:
    """Split http-backend output into (header block, start of body) once the blank line
    that ends the headers has arrived; None while it has not."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = buffer.find(sep)
        if at >= 0:
            return buffer[:at], buffer[at + len(sep) :]
    return None


def parse_cgi_headers(block: bytes) -> tuple[int, list[tuple[str, str]]]:
    """CGI headers → (status, headers). ``Status:`` sets the status; hop-by-hop headers are
    the server's business and dropped. Raises ValueError on anything malformed."""
    status = 200
    headers: list[tuple[str, str]] = []
    for raw in block.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise ValueError(f"malformed CGI header line {line[:80]!r}")
        key = name.strip().decode("latin-1")
        text = value.strip().decode("latin-1")
        if key.lower() == "status":
            status = int(text.split()[0])
            if not 100 <= status <= 599:
                raise ValueError(f"bad CGI status {text!r}")
        elif key.lower() not in _HOP_BY_HOP:
            headers.append((key, text))
    return status, headers


ZERO_IDS = frozenset({"0" * 40, "0" * 64})


@dataclass
class PushCommands:
    """Reads the ref updates (``<old> <new> <ref>``) at the start of a receive-pack request,
    fed chunk by chunk as it streams past. Used only to describe the push in the audit log;
    git itself decides what is applied."""

    commands: list[tuple[str, str, str]] = field(default_factory=list)
    done: bool = False
    _buffer: bytearray = field(default_factory=bytearray)

    MAX_BYTES = 1024 * 1024  # a push naming more refs than this is audited as "many"

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data
        while not self.done:
            if len(self._buffer) < 4:
                return
            try:
                size = int(self._buffer[:4], 16)
            except ValueError:
                self.done = True
                return
            if size == 0:  # flush: the pack follows
                self.done = True
                return
            if size < 4:
                self.done = True
                return
            if len(self._buffer) < size:
                if len(self._buffer) > self.MAX_BYTES:
                    self.done = True
                return
            line = bytes(self._buffer[4:size]).split(b"\0", 1)[0].rstrip(b"\n")
            del self._buffer[:size]
            parts = line.decode("utf-8", "replace").split(" ")
            if len(parts) == 3 and len(parts[0]) in (40, 64) and len(parts[1]) in (40, 64):
                self.commands.append((parts[0], parts[1], parts[2]))
        self._buffer.clear()


def push_outcome(
    commands: list[tuple[str, str, str]], refs_after: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """Compare what the push asked for with the refs afterwards:
    ("success" | "partial" | "failure", {ref: "updated" | "deleted" | "rejected"})."""
    results: dict[str, str] = {}
    for _old, new, ref in commands:
        if new in ZERO_IDS:
            results[ref] = "deleted" if ref not in refs_after else "rejected"
        else:
            results[ref] = "updated" if refs_after.get(ref) == new else "rejected"
    applied = sum(1 for r in results.values() if r != "rejected")
    if applied == len(results):
        return "success", results
    return ("partial" if applied else "failure"), results
