"""CML's model contract as the router reads and answers it.

A call is ``POST /model`` with ``{"accessKey": "...", "request": {...}}`` (the access key may
instead be ``?accessKey=`` in the query). The router checks the body the same way the model
server does (``kiln.serving.model_server.parse_request``: JSON, an object, not nested too
deeply, a ``request``), takes the access key out, and forwards ``{"request": ...}`` alone:
the key never reaches the model's code.

Refusals are ``application/problem+json`` carrying, beside the problem's members, CML's
``"success": false`` and ``"response": {"message": ...}``, so both kinds of client read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from kiln.serving.model_protocols import ProtocolError, json_object
from kiln.serving.model_server import CallFailed

TITLES = {
    400: "Bad request",
    401: "Authentication required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    411: "Length required",
    413: "Content too large",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}


@dataclass(frozen=True)
class CmlCall:
    access_key: str
    forward: bytes  # {"request": ...}, what the replica gets


def parse_call(body: bytes, query_string: bytes) -> CmlCall:
    """The access key and the body to forward, or ``CallFailed(400)`` saying what is wrong."""
    try:
        decoded = json_object(body, '{"accessKey": ..., "request": ...}')
    except ProtocolError as refused:
        raise CallFailed(refused.status, refused.message) from None
    if "request" not in decoded:
        raise CallFailed(400, 'the body has no "request" member')
    key = decoded.get("accessKey")
    if key is None:
        query = parse_qs(query_string.decode("latin-1"))
        key = (query.get("accessKey") or [""])[0]
    if not isinstance(key, str) or len(key) > 200:
        raise CallFailed(400, "accessKey must be a string (the model's access key)")
    forward = json.dumps({"request": decoded["request"]}, separators=(",", ":")).encode()
    return CmlCall(key, forward)


def problem(status: int, detail: str) -> bytes:
    payload: dict[str, Any] = {
        "type": "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "success": False,
        "response": {"message": detail},
    }
    return json.dumps(payload, separators=(",", ":")).encode()
