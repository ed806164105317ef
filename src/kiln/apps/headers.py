"""What crosses the proxy in headers, each way.

Towards the app: the browser's headers less hop-by-hop ones, any Kiln credential (Kiln's
cookies, an ``Authorization`` carrying an API key, a model API key or a workers token) and
anything claiming to be the user (``Remote-User``, ``Remote-Name``, ``Remote-Email`` in any
spelling, also with underscores, which WSGI servers read as the same variable) or the hop
(``X-Forwarded-*``, ``Forwarded``); then Kiln's own ``X-Forwarded-For/Proto/Host`` and, for a
signed-in user, ``Remote-User`` (the username), ``Remote-Name`` and ``Remote-Email`` (UTF-8).

Towards the browser: the app's headers less hop-by-hop ones and any cookie named like
Kiln's. A ``Domain`` attribute is taken off the app's cookies: every cookie stays host-only
to the app's own origin, so one app can neither read nor plant cookies for its siblings on
the content domain (or for Kiln's UI when it shares that domain). Framing stays limited to
the app's own origin unless the app says otherwise.
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass

from starlette.types import Scope

from kiln.api.deps import SESSION_COOKIE
from kiln.domain.app_access import Identity
from kiln.domain.identity import API_KEY_PREFIX
from kiln.domain.model_keys import PREFIX as MODEL_API_KEY_PREFIX
from kiln.domain.session_access import ACCESS_COOKIE
from kiln.domain.workload_tokens import PREFIX as WORKLOAD_TOKEN_PREFIX

# Hop-by-hop headers (RFC 9110 §7.6.1) are between two hops, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
IDENTITY_HEADERS = frozenset({b"remote-user", b"remote-name", b"remote-email"})
_KILN_CREDENTIALS = (API_KEY_PREFIX, WORKLOAD_TOKEN_PREFIX, MODEL_API_KEY_PREFIX)


@dataclass(frozen=True)
class Target:
    """A request for one origin of the content domain."""

    label: str  # the first DNS label: a session id, app-<id>, read-only-<id>, a subdomain
    host: str  # as the browser sent it, with the port
    origin: str  # scheme://host


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def parse_cookie(header_value: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header_value.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            jar.setdefault(name, value)
    return jar


def cookies(scope: Scope) -> dict[str, str]:
    jar: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        if key == b"cookie":
            for name, item in parse_cookie(value.decode("latin-1")).items():
                jar.setdefault(name, item)
    return jar


def is_kiln_cookie(name: str) -> bool:
    return name in (SESSION_COOKIE, ACCESS_COOKIE) or name.lower().startswith(
        ("__host-kiln", "kiln")
    )


def _carries_kiln_credential(value: bytes) -> bool:
    scheme, _, credential = value.decode("latin-1").strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "basic":
        try:
            credential = base64.b64decode(credential, validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            return False
        credential = credential.partition(":")[2]
    return credential.startswith(_KILN_CREDENTIALS)


def _identity_value(text: str) -> bytes:
    """UTF-8, with control characters (a line break would split the header) dropped."""
    return "".join(c for c in text if c >= " " and c != "\x7f").encode()


def forwarded_headers(
    scope: Scope, target: Target, who: Identity | None = None
) -> list[tuple[bytes, bytes]]:
    """The browser's headers as the app may see them (see the module docstring)."""
    out: list[tuple[bytes, bytes]] = []
    for key, value in scope.get("headers", ()):
        key = key.lower()
        if key in HOP_BY_HOP or key == b"forwarded" or key.startswith(b"x-forwarded-"):
            continue
        if key == b"expect":  # 100-continue is between the browser and Kiln's listener
            continue
        if key.startswith(b"sec-websocket-"):
            continue
        if key.replace(b"_", b"-") in IDENTITY_HEADERS:
            continue
        if key == b"authorization" and _carries_kiln_credential(value):
            continue
        if key == b"cookie":
            kept = [
                f"{name}={item}"
                for name, item in parse_cookie(value.decode("latin-1")).items()
                if not is_kiln_cookie(name)
            ]
            if not kept:
                continue
            value = "; ".join(kept).encode("latin-1")
        out.append((key, value))
    client = scope.get("client")
    if client:
        out.append((b"x-forwarded-for", str(client[0]).encode()))
    out.append((b"x-forwarded-proto", target.origin.split(":", 1)[0].encode()))
    out.append((b"x-forwarded-host", target.host.encode("latin-1")))
    if who is not None:
        out += identity_headers(who)
    return out


@functools.lru_cache(maxsize=4096)
def identity_headers(who: Identity) -> tuple[tuple[bytes, bytes], ...]:
    """``Remote-User`` and friends for ``who`` (made once per person, not per request)."""
    found = [(b"remote-user", _identity_value(who.username))]
    if who.name:
        found.append((b"remote-name", _identity_value(who.name)))
    if who.email:
        found.append((b"remote-email", _identity_value(who.email)))
    return tuple(found)


# What every answer on a content origin carries unless the app says otherwise (the UI's own
# security headers, kiln.api.headers, except that an app may frame its own pages).
DEFAULT_RESPONSE_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"referrer-policy", b"same-origin"),
)
HSTS = (b"strict-transport-security", b"max-age=31536000")


def response_headers(raw: list[tuple[bytes, bytes]], hsts: bool) -> list[tuple[bytes, bytes]]:
    """The app's answer headers as the browser may see them (see the module docstring)."""
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for key, value in raw:
        name = key.lower()
        if name in HOP_BY_HOP:
            continue
        if name == b"set-cookie":
            cookie = _host_only(value)
            if cookie is None:
                continue
            value = cookie
        seen.add(name)
        out.append((name, value))
    defaults = (*DEFAULT_RESPONSE_HEADERS, HSTS) if hsts else DEFAULT_RESPONSE_HEADERS
    out += [(name, value) for name, value in defaults if name not in seen]
    return out


def _host_only(value: bytes) -> bytes | None:
    """A ``Set-Cookie`` value without its ``Domain`` attribute; None for a cookie named like
    Kiln's, or without a name (browsers treat ``Set-Cookie: x`` as a nameless cookie)."""
    text = value.decode("latin-1")
    parts = text.split(";")
    name, eq, _ = parts[0].partition("=")
    if not eq or not name.strip() or is_kiln_cookie(name.strip()):
        return None
    kept = [parts[0]] + [
        p for p in parts[1:] if p.strip().partition("=")[0].strip().lower() != "domain"
    ]
    return ";".join(kept).encode("latin-1")


def raw_path(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return raw.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
