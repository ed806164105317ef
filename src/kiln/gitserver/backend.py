"""``git http-backend`` as a CGI child process, bridged to ASGI without buffering packs.

Flow of one exchange: start the process → stream the (gzip-decoded, counted) request body
into its stdin → read its CGI header block → stream its stdout to the client. Two bounded
buffers exist: the pipe to the child (the OS's) and a queue of at most ``QUEUE_CHUNKS``
chunks of its output waiting for the client. A slow client therefore slows git down instead
of growing memory, and a large push is never held whole in memory.

The response starts only after the whole request body has been handed to git, so a push
over the size limit can still be answered with a clean 413: git has not answered yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kiln.domain.errors import KilnError, TooLarge
from kiln.gitserver.protocol import (
    MAX_CGI_HEADER_BYTES,
    UnsupportedMediaType,
    parse_cgi_headers,
    split_cgi_headers,
)
from kiln.storage import git

log = logging.getLogger("kiln.gitserver")

CHUNK = 64 * 1024
QUEUE_CHUNKS = 16  # at most ~1 MiB of git's output waits for a slow client
# How long git may take to exit on its own once its client is gone. A push is never killed
# early: it may be checking out the new files, and a half-done checkout is worse than waiting.
FETCH_EXIT_GRACE_SECONDS = 30.0
PUSH_EXIT_GRACE_SECONDS = 600.0


class BackendFailed(KilnError):
    status = 502
    title = "Bad gateway"


class GitRefused(KilnError):
    """http-backend answered with an error of its own (a repository it cannot serve)."""

    status = 409
    title = "git failed"


class BadBody(KilnError):
    status = 400
    title = "Bad request"


async def decoded_body(
    stream: AsyncIterator[bytes], content_encoding: str | None
) -> AsyncIterator[bytes]:
    """The request body with any gzip removed, in chunks of at most ``CHUNK`` bytes.

    Kiln inflates gzip itself (rather than handing http-backend HTTP_CONTENT_ENCODING) so
    that the size limit counts inflated bytes: a small gzip bomb cannot get past it.
    """
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in stream:
            if chunk:
                yield chunk
        return
    if encoding not in ("gzip", "x-gzip"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not supported")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        async for chunk in stream:
            data = chunk
            while data and not inflater.eof:
                out = inflater.decompress(data, CHUNK)
                if out:
                    yield out
                data = inflater.unconsumed_tail
        rest = inflater.flush()
    except zlib.error as exc:
        raise BadBody(f"the request body is not valid gzip: {exc}") from exc
    if rest:
        yield rest
    if not inflater.eof:
        raise BadBody("the gzip request body is truncated")


@dataclass(frozen=True)
class Limit:
    """The most request-body bytes (after gzip) git may be fed, and what to say past it."""

    bytes: int
    message: str


@dataclass
class ExchangeResult:
    """How one exchange ended, for the caller's bookkeeping (audit, locks)."""

    returncode: int | None
    received: int  # request body bytes handed to git (after gzip)
    error: KilnError | None = None
    completed: bool = False  # the whole response reached the client
    stderr: str = ""  # the end of what git said on stderr: its own reason when it failed


class Backend:
    """One running http-backend: feed its stdin, then read its headers and body."""

    def __init__(self, proc: asyncio.subprocess.Process, abortable: bool) -> None:
        self.proc = proc
        # A fetch can be killed the moment its client is gone; a push is left to finish.
        self.abortable = abortable
        self.grace = FETCH_EXIT_GRACE_SECONDS if abortable else PUSH_EXIT_GRACE_SECONDS
        self.received = 0
        self._head: asyncio.Future[tuple[int, list[tuple[str, str]]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._stderr_tail = b""
        self._reader = asyncio.create_task(self._read_stdout())
        self._stderr = asyncio.create_task(self._read_stderr())
        self._finished: int | None = None

    @classmethod
    async def start(
        cls, repo: Path, env: dict[str, str], *, with_body: bool, abortable: bool
    ) -> Backend:
        """http-backend in ``repo``'s git sandbox (``kiln.storage.git``); read-only unless
        it is a push (``abortable`` is False): nothing a clone or fetch does needs to write."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *git.sandbox().command(repo, ["git", "http-backend"], env, writable=not abortable),
                stdin=asyncio.subprocess.PIPE if with_body else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=git.sandbox().root_env,
                cwd="/",
                start_new_session=True,  # its own process group: a kill reaches its children
            )
        except OSError as exc:
            log.error("cannot run git http-backend: %s", exc)
            raise BackendFailed("the server cannot run git; an administrator must fix it") from exc
        return cls(proc, abortable)

    async def feed(
        self, body: AsyncIterator[bytes], limit: Limit, observe: Callable[[bytes], None]
    ) -> None:
        """Stream ``body`` into git's stdin, then close it. Past the limit raise TooLarge:
        stdin is closed on a truncated request (for a push, a truncated pack, which git
        refuses whole)."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            async for chunk in body:
                if self.received + len(chunk) > limit.bytes:
                    raise TooLarge(limit.message)
                self.received += len(chunk)
                observe(chunk)
                stdin.write(chunk)
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # git stopped reading because it has already answered; that answer stands
        finally:
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()

    @property
    def stderr(self) -> str:
        return self._stderr_tail.decode(errors="replace").strip()[-2000:]

    async def response_head(self) -> tuple[int, list[tuple[str, str]]]:
        return await self._head

    async def stream(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def finish(self, *, aborted: bool = False) -> int:
        """Wait for git to exit, discarding any output nobody will read; kill its process
        group at once if the exchange was aborted and may be, or when it lingers past
        ``grace`` seconds. Idempotent."""
        if self._finished is not None:
            return self._finished
        if aborted and self.abortable:
            self._kill()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        drain = asyncio.create_task(self._discard_stdout())
        try:
            returncode = await asyncio.wait_for(self.proc.wait(), self.grace)
        except TimeoutError:
            log.warning("git http-backend %s did not exit; killing it", self.proc.pid)
            self._kill()
            returncode = await self.proc.wait()
        for task in (drain, self._stderr):
            try:
                await asyncio.wait_for(task, 5)
            except TimeoutError:  # a grandchild still holds the pipe; not our problem
                task.cancel()
        if self._head.done() and not self._head.cancelled():
            self._head.exception()  # retrieved, so asyncio does not warn about it
        else:
            self._head.cancel()
        if returncode != 0 and not (aborted and self.abortable):
            log.warning(
                "git http-backend exited %s: %s",
                returncode,
                self._stderr_tail.decode(errors="replace").strip()[-2000:],
            )
        self._finished = returncode
        return returncode

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        buffer = b""
        while (parts := split_cgi_headers(buffer)) is None:
            data = await stdout.read(CHUNK)
            if not data or len(buffer) > MAX_CGI_HEADER_BYTES:
                self._head.set_exception(
                    BackendFailed("git http-backend ended without a valid response")
                )
                return
            buffer += data
        block, rest = parts
        try:
            self._head.set_result(parse_cgi_headers(block))
        except ValueError as exc:
            self._head.set_exception(BackendFailed(f"git http-backend answered badly: {exc}"))
            return
        if rest:
            await self._queue.put(rest)
        while data := await stdout.read(CHUNK):
            await self._queue.put(data)
        await self._queue.put(None)

    async def _discard_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        while await stdout.read(CHUNK):
            pass

    async def _read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        while data := await stderr.read(CHUNK):
            self._stderr_tail = (self._stderr_tail + data)[-8192:]


class BackendResponse(Response):
    """Streams git's output, and always ends the exchange — the process reaped, ``on_close``
    run — whether the client read everything, went away, or the task was cancelled."""

    def __init__(
        self,
        backend: Backend,
        status: int,
        headers: list[tuple[str, str]],
        on_close: Callable[[ExchangeResult], Awaitable[None]],
    ) -> None:
        super().__init__(status_code=status)
        self.backend = backend
        self.on_close = on_close
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streamed = closed = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self.backend.stream():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            streamed = True
            # End the exchange before the last (empty) chunk: the client sees the request
            # finish only once git has exited, the audit is written and the lock is free.
            closed = True  # never twice, even if closing fails
            await self._close(streamed)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not closed:
                await self._close(streamed)

    async def _close(self, streamed: bool) -> None:
        with anyio.CancelScope(shield=True):
            returncode = await self.backend.finish(aborted=not streamed)
            await self.on_close(
                ExchangeResult(
                    returncode,
                    self.backend.received,
                    completed=streamed,
                    stderr=self.backend.stderr,
                )
            )


async def exchange(
    repo: Path,
    env: dict[str, str],
    body: AsyncIterator[bytes] | None,
    *,
    limit: Limit | None,
    observe: Callable[[bytes], None],
    on_close: Callable[[ExchangeResult], Awaitable[None]],
    abortable: bool,
) -> Response:
    """Run http-backend for one request. ``on_close`` runs exactly once, when git has exited
    (after the response streamed, or on failure before it). A KilnError (too large, bad
    gzip, git failing) is raised after ``on_close`` for the caller to render."""
    backend: Backend | None = None
    try:
        backend = await Backend.start(repo, env, with_body=body is not None, abortable=abortable)
        if body is not None:
            assert limit is not None
            await backend.feed(body, limit, observe)
        status, headers = await backend.response_head()
        if status >= 400:
            raise await _refusal(backend, status)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            returncode = await backend.finish(aborted=True) if backend else None
            stderr = backend.stderr if backend else ""
            error = exc if isinstance(exc, KilnError) else None
            if isinstance(exc, BackendFailed) and stderr:
                # git's own words say what is wrong with the repository.
                error = BackendFailed(f"{exc.detail}; git said: {stderr}")
            received = backend.received if backend else 0
            await on_close(ExchangeResult(returncode, received, error=error, stderr=stderr))
        if error is not None and error is not exc:
            raise error from exc
        raise
    return BackendResponse(backend, status, headers, on_close)


async def _refusal(backend: Backend, status: int) -> GitRefused:
    """http-backend's own error answer (its body is a line at most, its reason on stderr)
    as a problem that says what git said."""
    body = b""
    async for chunk in backend.stream():
        body += chunk
        if len(body) > MAX_CGI_HEADER_BYTES:
            break
    await backend.finish()
    said = backend.stderr or body.decode(errors="replace").strip()
    return GitRefused(
        f"git cannot serve this repository (http-backend answered {status}); "
        f"git said: {said or 'nothing'}"
    )
