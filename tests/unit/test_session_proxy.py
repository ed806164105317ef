"""The content proxy's pure parts as sessions use them: which Host is a session's origin, what
the editor is told (never a Kiln credential), what of its answer the browser gets, and the
signed tokens. (Applications' own rules: tests/unit/test_app_proxy_rules.py.)"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from kiln.apps.headers import Target, forwarded_headers, response_headers
from kiln.apps.proxy import ContentProxy
from kiln.domain import session_access as access
from kiln.domain.session_editors import Readiness, output_tail, poll_editor

SECRET = b"s" * 32
SID = "0123456789abcdef"


def scope(host: str, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": "https",
        "headers": [(b"host", host.encode()), *(headers or [])],
    }


@pytest.mark.parametrize(
    ("domain", "host", "session"),
    [
        ("localhost", f"{SID}.kiln.localhost:8443", SID),
        ("localhost", f"{SID.upper()}.KILN.localhost.", SID),
        ("kiln.example.com", f"{SID}.kiln.example.com", SID),
        ("localhost", "localhost:8443", None),  # the UI
        ("kiln.example.com", "kiln.example.com", None),  # the UI, whose name is the suffix
        ("localhost", f"a.{SID}.kiln.localhost", None),  # two labels deep
        ("localhost", f"{SID}.kiln.localhost.evil.example", None),
        ("localhost", f"{SID}kiln.localhost", None),
        ("localhost", "-x.kiln.localhost", None),
        ("localhost", "", None),
    ],
)
def test_a_session_origin_is_one_label_under_the_content_domain(
    domain: str, host: str, session: str | None
) -> None:
    target = ContentProxy(None, domain).target(scope(host))  # type: ignore[arg-type]
    assert (target.label if target else None) == session
    if target is not None:
        assert target.origin == f"https://{host}"


def test_the_editor_never_sees_a_kiln_credential() -> None:
    headers = [
        (b"authorization", b"Bearer kiln_secret"),
        (b"cookie", b"__Host-kiln_session=abc; _xsrf=t1; __Host-kiln_session_access=v"),
        (b"cookie", b"kiln_other=1"),
        (b"connection", b"keep-alive"),
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"accept", b"text/html"),
    ]
    target = Target(SID, f"{SID}.kiln.localhost:8443", f"https://{SID}.kiln.localhost:8443")
    sent = forwarded_headers({**scope(target.host, headers), "client": ("10.1.2.3", 5)}, target)
    names = [k for k, _ in sent]
    assert b"authorization" not in names and b"connection" not in names
    assert [v for k, v in sent if k == b"cookie"] == [b"_xsrf=t1"]  # only the editor's own
    assert (b"x-forwarded-for", b"10.1.2.3") in sent
    assert (b"x-forwarded-for", b"6.6.6.6") not in sent
    assert (b"host", target.host.encode()) in sent and (b"accept", b"text/html") in sent


def test_the_editor_cannot_set_kiln_cookies_or_hop_headers() -> None:
    raw = [
        (b"Set-Cookie", b"_xsrf=2|abc; Path=/"),
        (b"Set-Cookie", b"__Host-kiln_session_access=forged; Path=/; Secure"),
        (b"Set-Cookie", b"__Host-kiln_session=forged; Path=/; Secure"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Type", b"text/html"),
    ]
    out = response_headers(raw, hsts=True)
    assert (b"set-cookie", b"_xsrf=2|abc; Path=/") in out
    assert not any(b"kiln" in v for k, v in out if k == b"set-cookie")
    assert b"transfer-encoding" not in {k for k, _ in out}
    assert (b"x-frame-options", b"SAMEORIGIN") in out  # framed by its own pages only


def test_tokens_are_signed_timed_single_purpose_and_for_one_session() -> None:
    now = time.time()
    token = access.handoff_token(SECRET, SID, 7, now)
    cookie = access.access_cookie(SECRET, SID, 7, now, 3600)
    assert access.read_access_cookie(SECRET, cookie, SID, now + 10) == 7
    refusals = {
        "signature": lambda: access.read_access_cookie(b"t" * 32, cookie, SID, now),
        "another session": lambda: access.read_access_cookie(SECRET, cookie, "f" * 16, now),
        "expired": lambda: access.read_access_cookie(SECRET, cookie, SID, now + 3601),
        "no access": lambda: access.read_access_cookie(SECRET, None, SID, now),
        # A hand-off token is not a cookie, nor the other way round.
        "signature ": lambda: access.read_access_cookie(SECRET, token, SID, now),
        "malformed": lambda: access.read_access_cookie(SECRET, "x.y.z", SID, now),
    }
    for words, attempt in refusals.items():
        with pytest.raises(access.AccessRefused, match=words.strip()):
            attempt()


def test_session_origin_keeps_the_port_the_ui_was_reached_on() -> None:
    assert access.session_origin("localhost", "https", 8443, SID) == (
        f"https://{SID}.kiln.localhost:8443"
    )
    assert access.session_origin("kiln.example.com", "https", 443, SID) == (
        f"https://{SID}.kiln.example.com"
    )


def test_editor_readiness() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    later = start + dt.timedelta(seconds=5)
    never = lambda endpoint, path: False  # noqa: E731
    assert poll_editor("terminal", "", start, later, never) is Readiness.READY
    assert poll_editor("jupyterlab", "127.0.0.1:1", start, later, never) is Readiness.WAITING
    assert poll_editor("jupyterlab", "127.0.0.1:1", start, later, lambda e, p: True) is (
        Readiness.READY
    )
    late = start + dt.timedelta(hours=1)
    assert poll_editor("jupyterlab", "", start, late, never) is Readiness.TOO_LATE
    tail = output_tail([b"a\n" * 50, b"\n  last words \n"])
    assert tail.endswith("last words") and "\n" not in tail
