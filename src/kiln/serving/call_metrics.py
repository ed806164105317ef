"""A call's tracked metrics on their way from the replica to the database.

The router asks each replica for the call's metrics (``X-Kiln-Metrics: 1``); a model server
that has some answers ``X-Kiln-Metrics-Length: N`` and puts N bytes of them (a JSON array of
records, ``kiln.serving.model_server``) before the answer. The router takes them off, so the
caller gets the answer alone, and stores them (``kiln.domain.model_metrics``) before it
answers: a caller that has the prediction's UUID can add delayed metrics to it at once.
A replica built before metrics existed ignores the header and sends the answer alone.

Nothing from a replica is trusted: a bad length is a failed call (502); bad or oversized
records are dropped with a log line, and the call is answered.
"""

from __future__ import annotations

import logging

from anyio import to_thread

from kiln.api.deps import KilnContext
from kiln.domain import model_metrics
from kiln.serving.model_server import METRICS_LENGTH_HEADER, METRICS_REQUEST_HEADER, CallFailed

log = logging.getLogger("kiln.serving.router")

REQUEST_HEADER = (METRICS_REQUEST_HEADER.lower().encode(), b"1")
LENGTH_HEADER = METRICS_LENGTH_HEADER.lower().encode()


def split(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[bytes, bytes]:
    """The answer and the metrics before it (``b""`` when the replica sent none)."""
    length = next((v for k, v in headers if k.lower() == LENGTH_HEADER), None)
    if length is None:
        return body, b""
    if not length.isdigit() or int(length) > len(body):
        raise CallFailed(502, "the model's replica sent a malformed answer")
    size = int(length)
    return body[size:], body[:size]


async def store(ctx: KilnContext, model_id: int, replica_id: str, payload: bytes) -> None:
    """Store the call's records; failures are logged, never the caller's problem."""
    try:
        predictions = model_metrics.parse_replica_records(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("model %s: replica %s sent bad metrics: %s", model_id, replica_id, exc)
        return

    def write() -> None:
        with ctx.sessions() as db:
            model_metrics.store_predictions(db, model_id, replica_id, predictions)

    try:
        await to_thread.run_sync(write)
    except Exception:  # the database may be away; the prediction still answers
        log.exception("model %s: storing the metrics of a call failed", model_id)
