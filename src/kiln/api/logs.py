"""Streaming a workload's console log from the runner as a text response (job runs,
sessions): errors (404 unknown to the runner, 503 runner down) are answered as such before
the 200 is sent; ``follow`` keeps the response open until the workload ends."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator

from fastapi.responses import StreamingResponse

from kiln.runner.client import RunnerClient

TEXT = "text/plain; charset=utf-8"


def empty_log() -> StreamingResponse:
    return StreamingResponse(iter(()), media_type=TEXT)


def stream_chunks(chunks: Generator[bytes, None, None]) -> StreamingResponse:
    """A log as a text response, streamed as the chunks come (closed with the response)."""

    def body() -> Iterator[bytes]:
        with contextlib.closing(chunks):
            yield from chunks

    return StreamingResponse(body(), media_type=TEXT, headers={"Cache-Control": "no-store"})


def stream_log(
    client: RunnerClient, runner_workload_id: str, offset: int, follow: bool
) -> StreamingResponse:
    client.status(runner_workload_id)  # a 404 or 503 is answered as such, before the 200
    return stream_chunks(client.logs(runner_workload_id, offset, follow))
