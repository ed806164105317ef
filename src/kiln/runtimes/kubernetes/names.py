"""Kubernetes object names from names people choose. Pure functions.

Usernames, team names and workload ids are user-controlled: upper case, dots, underscores and
any length are allowed in Kiln, none of them in most Kubernetes names (a DNS-1123 label: at
most 63 characters of ``a-z``, ``0-9`` and ``-``, starting and ending with an alphanumeric).

The rule, and why it never collides:

- a name that already is a valid label (and is not shaped like our hashed form) is used as is;
- any other name becomes its sanitized form, cut short, plus ``-h`` and 12 hex digits of the
  SHA-256 of the *original* name.

An output without the hash suffix therefore came from exactly one input (itself); an output
with it came from an input that was not used as is, and two such inputs collide only if their
SHA-256 prefixes (48 bits) do. A valid name that happens to end like a hash suffix is hashed
too, so nobody can pick a name that impersonates another's hashed form.
"""

from __future__ import annotations

import hashlib
import re

MAX_LABEL = 63
_VALID = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_HASHED = re.compile(r"-h[0-9a-f]{12}$")
_NOT_ALLOWED = re.compile(r"[^a-z0-9]+")
_HASH_LEN = 12
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")

NAMESPACE_PREFIX = "kiln-"
USER_NAMESPACE = "kiln-u-"
TEAM_NAMESPACE = "kiln-t-"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def dns_label(text: str, prefix: str = "", max_len: int = MAX_LABEL) -> str:
    """``prefix + text`` as a valid, collision-free DNS-1123 label of at most ``max_len``.

    ``prefix`` must itself be a valid start of a label (lower case, e.g. ``"kiln-u-"``).
    """
    if not text:
        raise ValueError("a name cannot be empty")
    room = max_len - len(prefix)
    if _VALID.match(text) and len(text) <= room and not _HASHED.search(text):
        return prefix + text
    suffix = f"-h{_digest(text)}"
    readable = _NOT_ALLOWED.sub("-", text.lower()).strip("-")
    readable = readable[: room - len(suffix)].rstrip("-")
    name = f"{prefix}{readable}{suffix}" if readable else f"{prefix}{suffix[1:]}"
    if not _VALID.match(name) or len(name) > max_len:  # a bad prefix; a programming error
        raise ValueError(f"prefix {prefix!r} cannot start a DNS label")
    return name


def user_namespace(username: str) -> str:
    """``kiln-u-{user}``: where a user's own workloads run."""
    return dns_label(username, USER_NAMESPACE)


def team_namespace(team: str) -> str:
    """``kiln-t-{team}``: where workloads of a team's projects run."""
    return dns_label(team, TEAM_NAMESPACE)


def pod_name(workload_id: str) -> str:
    """A workload's pod (and, for a declared port, its Service: ``svc_name``)."""
    return dns_label(workload_id, "w-")


def service_name(workload_id: str) -> str:
    """Services need a DNS-1035 label (starting with a letter): ``w-`` guarantees it."""
    return pod_name(workload_id)


def project_claim(project_id: int) -> str:
    """The PVC of a project inside a namespace (one per namespace and project)."""
    if project_id <= 0:
        raise ValueError("project ids are positive")
    return f"project-{project_id}"


def project_volume(namespace: str, project_id: int) -> str:
    """The cluster-wide PV bound to ``project_claim`` in ``namespace`` (PVs are not
    namespaced, so the namespace is part of the name; at most 253 characters)."""
    return f"{namespace}-{project_claim(project_id)}"


def label_value(text: str) -> str:
    """A label value (63 characters of ``[A-Za-z0-9_.-]``, alphanumeric at both ends):
    ``text`` itself when it is one, else its ``dns_label`` form."""
    if _LABEL_VALUE.match(text) and not _HASHED.search(text):
        return text
    return dns_label(text)
