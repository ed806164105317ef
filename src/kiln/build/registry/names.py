"""Repository names, references and digests, and how Kiln's names become OCI names.

Repositories are ``{owner}/{project}/{name}`` (a project's images; ``{name}`` may have
several components, ``alice/churn/models/scorer``) and ``runtimes/{name}`` (site runtimes).
An OCI name component is ``[a-z0-9]+`` joined by single separators ``.``, ``_``, ``__`` or a
run of ``-``. Kiln's user, team and project names are lowercase letters, digits, ``.``, ``_``
and ``-`` and never contain ``..``, so they are OCI components as they are unless they hold a
run of separators OCI does not allow (``a_-b``, ``x._y``, ``m___n``): each such run becomes a
single ``-`` (``a_-b`` → ``a-b``). When that form is also another project's own name, the
name that needs no mapping wins; the other project's images need a rename of one of them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kiln.build.registry.errors import DigestInvalid, NameInvalid

RUNTIMES = "runtimes"
MAX_NAME_LENGTH = 255
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_SEPARATOR_RUN = re.compile(r"[._-]+")
_VALID_RUN = re.compile(r"\.|_|__|-+")
ALGORITHMS = {"sha256": 64, "sha512": 128}
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*")
_DIGEST = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")


@dataclass(frozen=True)
class RepositoryName:
    """A parsed repository name: a project's (``owner``/``project`` set, as OCI components)
    or a site runtime's."""

    name: str
    owner: str | None = None
    project: str | None = None

    @property
    def is_runtime(self) -> bool:
        return self.owner is None


def parse_repository(name: str) -> RepositoryName:
    """Check ``name`` against the OCI grammar and Kiln's two namespaces."""
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name is {len(name)} characters, over {MAX_NAME_LENGTH}")
    if not _NAME.fullmatch(name):
        raise NameInvalid(
            f"invalid repository name {name[:100]!r}: use lowercase letters and digits, "
            "components joined by '.', '_', '__' or '-', separated by '/'"
        )
    parts = name.split("/")
    if parts[0] == RUNTIMES:
        if len(parts) < 2:
            raise NameInvalid("runtime repositories are named runtimes/{name}")
        return RepositoryName(name)
    if len(parts) < 3:
        raise NameInvalid(
            f"repository {name!r} is neither {{owner}}/{{project}}/{{name}} nor runtimes/{{name}}"
        )
    return RepositoryName(name, owner=parts[0], project=parts[1])


def oci_component(kiln_name: str) -> str:
    """A Kiln user, team or project name as an OCI name component (see the module doc)."""

    def fix(run: re.Match[str]) -> str:
        return run[0] if _VALID_RUN.fullmatch(run[0]) else "-"

    return _SEPARATOR_RUN.sub(fix, kiln_name)


def project_repository(owner: str, project: str, image: str) -> str:
    """The repository of image ``image`` of project ``owner/project`` (Kiln names)."""
    return f"{oci_component(owner)}/{oci_component(project)}/{image}"


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise NameInvalid(f"invalid tag {tag[:140]!r}")
    return tag


def is_digest(reference: str) -> bool:
    return ":" in reference


def check_digest(digest: str) -> str:
    """A digest Kiln can verify: ``sha256:<64 hex>`` or ``sha512:<128 hex>``."""
    if not _DIGEST.fullmatch(digest):
        algorithm, colon, _ = digest.partition(":")
        if colon and algorithm not in ALGORITHMS and _ALGORITHM.fullmatch(algorithm):
            raise DigestInvalid(f"unsupported digest algorithm {algorithm[:20]!r}")
        raise DigestInvalid(f"invalid digest {digest[:150]!r}")
    return digest


def hasher(digest: str) -> hashlib._Hash:
    """A fresh hash object of ``digest``'s algorithm."""
    return hashlib.new(check_digest(digest).partition(":")[0])


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
