"""The pure rules of applications and of the content proxy: which subdomains an application
may take, what a label names, what an app is told (and never told) in headers, what of its
answer reaches the browser, its status in words, and the crash back-off."""

from __future__ import annotations

import base64
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest

from kiln.apps.headers import Target, forwarded_headers, response_headers
from kiln.domain.app_access import Identity, Kind, kind_of
from kiln.domain.applications import CRASH_LOOP, check_subdomain, describe
from kiln.domain.errors import InvalidInput
from kiln.runner.applications import BACKOFF_MAX, backoff

TARGET = Target("sales", "sales.kiln.localhost:8443", "https://sales.kiln.localhost:8443")
ALICE = Identity("alice", "Alice Ångström", "alice@example.com")


@pytest.mark.parametrize(
    ("subdomain", "words"),
    [
        ("www", "reserved for Kiln"),
        ("api", "reserved for Kiln"),
        ("modelservice", "reserved for Kiln"),
        ("registry", "reserved for Kiln"),
        ("0123456789abcdef", "looks like a session id"),
        ("Sales", "not valid"),
        ("a" * 64, "not valid"),
        ("a..b", "not valid"),
        ("a.b", "not valid"),
        ("-sales", "not valid"),
        ("sales-", "not valid"),
        ("sa_les", "not valid"),
        ("", "not valid"),
        ("sälen", "not valid"),
        ("app-0123456789abcdef", "reserved"),
        ("read-only-0123456789abcdef", "reserved"),
        ("app-dashboard", "reserved"),
        ("xn--sln-sna", "reserved"),
        ("ab--cd", "reserved"),
    ],
)
def test_subdomains_an_application_may_not_take(subdomain: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        check_subdomain(subdomain)


@pytest.mark.parametrize("subdomain", ["sales", "a", "q3-report", "a" * 63, "0123456789abcde"])
def test_subdomains_an_application_may_take(subdomain: str) -> None:
    assert check_subdomain(subdomain) == subdomain


def test_what_a_label_names() -> None:
    sid = "0123456789abcdef"
    assert kind_of(sid) == (Kind.EDITOR, sid)
    assert kind_of(f"app-{sid}") == (Kind.SESSION_APP, sid)
    assert kind_of(f"read-only-{sid}") == (Kind.SESSION_READ_ONLY, sid)
    assert kind_of("sales") == (Kind.APPLICATION, "sales")


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"headers": [(b"host", TARGET.host.encode()), *headers], "client": ("10.1.2.3", 5)}


def test_the_app_is_told_who_the_user_is_and_nobody_else_may_say() -> None:
    claimed = [
        (b"remote-user", b"root"),
        (b"remote_user", b"root"),  # WSGI servers read this as REMOTE_USER too
        (b"Remote-Name", b"Root"),
        (b"remote-email", b"root@evil"),
        (b"x-forwarded-host", b"evil.example"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"accept", b"text/html"),
    ]
    sent = forwarded_headers(_scope(claimed), TARGET, ALICE)
    identity = [(k, v) for k, v in sent if k.startswith(b"remote")]
    assert identity == [
        (b"remote-user", b"alice"),
        (b"remote-name", "Alice Ångström".encode()),
        (b"remote-email", b"alice@example.com"),
    ]
    assert (b"x-forwarded-host", TARGET.host.encode()) in sent
    assert (b"x-forwarded-proto", b"https") in sent and (b"x-forwarded-for", b"10.1.2.3") in sent
    assert b"evil" not in b"".join(v for _, v in sent) and (b"accept", b"text/html") in sent
    anonymous = forwarded_headers(_scope(claimed), TARGET, None)
    assert not [k for k, _ in anonymous if k.replace(b"_", b"-").startswith(b"remote")]


def test_identity_values_cannot_split_a_header() -> None:
    sneaky = Identity("bob", "Bob\r\nSet-Cookie: x=1", "bob@example.com\n")
    sent = dict(forwarded_headers(_scope([]), TARGET, sneaky))
    assert sent[b"remote-name"] == b"BobSet-Cookie: x=1"
    assert sent[b"remote-email"] == b"bob@example.com"


def test_kiln_credentials_stay_behind_and_the_apps_own_pass() -> None:
    app_basic = base64.b64encode(b"reader:app-password").decode()
    key_basic = base64.b64encode(b"alice:kiln_secretkey").decode()
    cases = {
        f"Basic {app_basic}".encode(): True,  # the app's own login
        b"Bearer some-app-token": True,
        b"Bearer kiln_secretkey": False,  # a Kiln API key
        b"Bearer kwt_workerstoken": False,  # a session's workers token
        f"Basic {key_basic}".encode(): False,
    }
    for value, kept in cases.items():
        sent = forwarded_headers(_scope([(b"authorization", value)]), TARGET)
        assert ((b"authorization", value) in sent) is kept, value


def test_app_cookies_pass_host_only() -> None:
    raw = [
        (b"Set-Cookie", b"session=abc; Path=/; HttpOnly"),
        (b"Set-Cookie", b"tossed=1; Domain=.kiln.localhost; Path=/"),
        (b"Set-Cookie", b"also=2; path=/; DOMAIN=kiln.localhost; Secure"),
        (b"Set-Cookie", b"__Host-kiln_session=forged; Path=/; Secure"),
        (b"Set-Cookie", b"Kiln_Thing=forged"),
        (b"Set-Cookie", b"__Host-kiln_session_access"),  # nameless: no
        (b"Set-Cookie", b'odd="a b c"; Path=/'),  # a value SimpleCookie would reject
        (b"Content-Type", b"text/html"),
    ]
    cookies = [v for k, v in response_headers(raw, hsts=True) if k == b"set-cookie"]
    assert cookies == [
        b"session=abc; Path=/; HttpOnly",
        b"tossed=1; Path=/",
        b"also=2; path=/; Secure",
        b'odd="a b c"; Path=/',
    ]


def _app(**values: Any) -> Any:
    defaults = {
        "desired": "running",
        "status_message": "",
        "crashes": 0,
        "restart_at": None,
    }
    return SimpleNamespace(**{**defaults, **values})


def _instance(state: str, reason: str = "") -> Any:
    return SimpleNamespace(state=state, reason=reason)


def test_an_applications_status_in_words() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    running = describe(_app(), _instance("running"), None, now)
    assert (running.state, running.serving, running.restarting) == ("running", True, False)
    restarting = describe(_app(), _instance("running"), _instance("starting"), now)
    assert restarting.restarting and restarting.serving
    waiting = describe(
        _app(), _instance("waiting", "waiting for quota: alice uses 2 of 2"), None, now
    )
    assert waiting.state == "waiting" and "alice uses 2 of 2" in waiting.message
    crashed = _app(
        crashes=1, status_message="exited with code 3", restart_at=now + dt.timedelta(seconds=4)
    )
    said = describe(crashed, _instance("failed"), None, now)
    assert said.state == "crashed" and said.message == (
        "it ended: exited with code 3; next start in 4 s"
    )
    looping = describe(_app(crashes=CRASH_LOOP, status_message="boom"), None, None, now)
    assert looping.state == "crash-looping" and "ended 3 times in a row" in looping.message
    stopped = describe(_app(desired="stopped", status_message="stopped by alice"), None, None, now)
    assert (stopped.state, stopped.message) == ("stopped", "stopped by alice")
    stopping = describe(_app(desired="stopped"), _instance("stopping"), None, now)
    assert stopping.state == "stopping" and not stopping.serving


def test_crash_back_off_doubles_up_to_five_minutes() -> None:
    assert [backoff(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert backoff(40) == BACKOFF_MAX == 300
