"""Reading a workload's console output a piece at a time for pages that follow it live (a
job run's log, an application's): each poll shows at most ``LOG_CHUNK`` bytes from where
the last one stopped, never splitting a multi-byte character."""

from __future__ import annotations

from collections.abc import Generator

from fastapi import Request

from kiln.api.deps import KilnContext
from kiln.runner.client import runner_client

# One poll of the log shows at most this much; the next poll continues from there.
LOG_CHUNK = 256 * 1024


def decodable(data: bytes, final: bool) -> tuple[str, int]:
    """The text of ``data`` and how many bytes it used: a multi-byte character cut at the
    end of a chunk waits for the next poll (unless nothing more will come)."""
    if not final:
        for cut in range(4):
            try:
                return data[: len(data) - cut].decode(), len(data) - cut
            except UnicodeDecodeError:
                continue
    return data.decode(errors="replace"), len(data)


def read_chunk(
    request: Request, ctx: KilnContext, runner_workload_id: str, offset: int, ended: bool
) -> tuple[str, int]:
    """Up to ``LOG_CHUNK`` bytes of a runner workload's output from ``offset``: (text, next
    offset)."""
    client = runner_client(request.app.state, ctx.settings)
    text, used = read_log_chunk(client.logs(runner_workload_id, offset, False), ended=ended)
    return text, offset + used


def read_log_chunk(chunks: Generator[bytes, None, None], *, ended: bool) -> tuple[str, int]:
    """Up to ``LOG_CHUNK`` bytes of a log stream (the runner's or the builder's) as text:
    (text, bytes used). The stream is closed; a character cut at the end waits for the next
    poll unless the log has ended."""
    data = b""
    try:
        for chunk in chunks:
            data += chunk
            if len(data) >= LOG_CHUNK:
                break
    finally:
        chunks.close()
    return decodable(data, final=ended and len(data) < LOG_CHUNK)
