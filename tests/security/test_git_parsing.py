"""The pure parsers of git smart HTTP, fed hostile input: URLs, CGI headers, push commands,
gzip bodies. No server, no database."""

from __future__ import annotations

import asyncio
import gzip
import random
from collections.abc import AsyncIterator

import pytest

from kiln.domain.errors import KilnError
from kiln.gitserver.backend import CHUNK, BadBody, decoded_body
from kiln.gitserver.protocol import (
    MethodNotAllowed,
    PushCommands,
    UnsupportedMediaType,
    backend_env,
    parse_cgi_headers,
    parse_route,
    push_outcome,
    split_cgi_headers,
)

A, B = "a" * 40, "b" * 40


def _pkt(line: bytes) -> bytes:
    return f"{len(line) + 4:04x}".encode() + line


@pytest.mark.parametrize(
    ("tail", "status"),
    [
        ("alice/demo.git/objects/info/packs", 404),
        ("alice/demo.git/info/refs/../x", 404),
        ("../alice/demo.git/info/refs", 404),
        ("alice/../demo.git/git-upload-pack", 404),
        ("alice/..git/info/refs", 404),
        ("alice/.git/info/refs", 404),
        ("alice/demo.git.git/info/refs", 404),
        ("alice/-demo.git/info/refs", 404),
        ("alice/de\x00mo.git/info/refs", 404),
        ("alice/demo.git", 404),
        ("", 404),
    ],
)
def test_routes_that_name_no_project_are_404(tail: str, status: int) -> None:
    with pytest.raises(KilnError) as raised:
        parse_route("GET", tail, "git-upload-pack")
    assert raised.value.status == status


def test_routes_select_service_and_action() -> None:
    fetch = parse_route("GET", "alice/demo.git/info/refs", "git-upload-pack")
    assert (fetch.owner, fetch.slug, fetch.advertise, fetch.action.value) == (
        "alice",
        "demo",
        True,
        "view",
    )
    push = parse_route("POST", "alice/demo/git-receive-pack", None)
    assert push.is_push and push.action.value == "write" and not push.advertise
    assert push.backend_path == "/.git/git-receive-pack"
    with pytest.raises(MethodNotAllowed):
        parse_route("GET", "alice/demo.git/git-receive-pack", None)
    with pytest.raises(KilnError) as dumb:
        parse_route("GET", "alice/demo.git/info/refs", None)
    assert dumb.value.status == 400 and "smart HTTP" in dumb.value.detail


def test_backend_env_is_confined_and_hardened() -> None:
    route = parse_route("POST", "alice/demo.git/git-receive-pack", None)
    env = backend_env(
        route,
        username="alice",
        address="10.0.0.1",
        git_protocol="version=2\nGIT_DIR=/etc",
        max_push_bytes=1000,
    )
    # The repository, as git sees it inside its sandbox (kiln.storage.gitsandbox).
    assert env["GIT_PROJECT_ROOT"] == "/home/cdsw"
    assert env["PATH_INFO"] == "/.git/git-receive-pack"
    assert "CONTENT_LENGTH" not in env and "HTTP_CONTENT_ENCODING" not in env
    assert "HTTP_GIT_PROTOCOL" not in env  # a header with a newline is dropped, not passed
    assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_CONFIG_GLOBAL"] == "/dev/null"
    config = {
        env[f"GIT_CONFIG_KEY_{i}"]: env[f"GIT_CONFIG_VALUE_{i}"]
        for i in range(int(env["GIT_CONFIG_COUNT"]))
    }
    assert config["core.hooksPath"] == "/dev/null"
    assert config["receive.fsckObjects"] == "true"
    assert config["receive.maxInputSize"] == "1000"
    assert "GIT_DIR" not in env


def test_cgi_headers() -> None:
    assert split_cgi_headers(b"Content-Type: x\r\n") is None
    block, rest = split_cgi_headers(b"Status: 403 Forbidden\r\nContent-Type: text/plain\r\n\r\nno")
    assert rest == b"no"
    status, headers = parse_cgi_headers(block)
    assert status == 403 and headers == [("Content-Type", "text/plain")]
    _, dropped = parse_cgi_headers(b"Transfer-Encoding: chunked\nConnection: close\nX: 1")
    assert dropped == [("X", "1")]
    for bad in (b"no colon here", b"Status: abc", b"Status: 999 Nope", b": empty name"):
        with pytest.raises(ValueError):
            parse_cgi_headers(bad)


def test_push_commands_are_read_across_chunk_boundaries() -> None:
    body = (
        _pkt(f"{A} {B} refs/heads/main\0report-status side-band-64k\n".encode())
        + _pkt(f"{B} {'0' * 40} refs/heads/old\n".encode())
        + b"0000PACK\x00\x00\x00\x02"
    )
    reader = PushCommands()
    for i in range(len(body)):
        reader.feed(body[i : i + 1])
    assert reader.done
    assert reader.commands == [(A, B, "refs/heads/main"), (B, "0" * 40, "refs/heads/old")]
    outcome, refs = push_outcome(reader.commands, {"refs/heads/main": B})
    assert outcome == "success" and refs == {
        "refs/heads/main": "updated",
        "refs/heads/old": "deleted",
    }
    assert (
        push_outcome(reader.commands, {"refs/heads/main": A, "refs/heads/old": B})[0] == "failure"
    )
    assert push_outcome(reader.commands, {"refs/heads/main": A})[0] == "partial"


def test_push_command_reader_survives_garbage() -> None:
    rng = random.Random(7)
    for _ in range(300):
        reader = PushCommands()
        reader.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(200))))
        assert all(len(c) == 3 for c in reader.commands)
    endless = PushCommands()
    endless.feed(b"ffff" + b"x" * (2 * PushCommands.MAX_BYTES))
    assert endless.done and endless.commands == []


async def _collect(chunks: list[bytes], encoding: str | None) -> list[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [part async for part in decoded_body(stream(), encoding)]


def test_gzip_is_inflated_in_bounded_chunks() -> None:
    bomb = gzip.compress(bytes(8 * 1024 * 1024))
    parts = asyncio.run(_collect([bomb[i : i + 1000] for i in range(0, len(bomb), 1000)], "gzip"))
    assert sum(map(len, parts)) == 8 * 1024 * 1024
    assert max(map(len, parts)) <= CHUNK
    assert asyncio.run(_collect([b"abc", b"", b"def"], None)) == [b"abc", b"def"]


@pytest.mark.parametrize(
    ("chunks", "encoding", "error"),
    [
        ([b"not gzip at all"], "gzip", BadBody),
        ([gzip.compress(b"x" * 1000)[:-12]], "gzip", BadBody),
        ([b"x"], "br", UnsupportedMediaType),
    ],
)
def test_bad_bodies_are_4xx(chunks: list[bytes], encoding: str, error: type[KilnError]) -> None:
    with pytest.raises(error) as raised:
        asyncio.run(_collect(chunks, encoding))
    assert 400 <= raised.value.status < 500
