"""The model service's paths for the protocols other than CML's: ``/{owner}/{project}/{model}/``
followed by a KServe V1, Open Inference V2 or MLflow path (``kiln.serving.model_protocols``).

The prefix names the model (a model's name is unique in its project only), so the call needs
no access key: the caller's model API key (``Authorization: Bearer kilnm_...``) is checked
against the model's project as for ``POST /model`` (``kiln.domain.model_keys``). An
``accessKey`` in the query is not needed and is ignored (it is never forwarded). On the main
host the prefix sits under ``/modelservice/``, so nothing collides with the registry's
``/v2/``.

What goes to the replica: the method, the protocol's path (the prefix taken off), the body,
the request headers the protocols read (``FORWARDED_HEADERS``) and the model's current name
(``X-Kiln-Model-Name``: the replica answers to it even after a rename). Refusals by the router
(authentication, a full queue, a timeout) are problem+json carrying the protocol's own error
members too (``{"error": ...}``; MLflow's ``error_code`` and ``message``), so both kinds of
client read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kiln.serving import model_protocols
from kiln.serving.cml import TITLES
from kiln.serving.model_server import CallFailed

FORWARDED_HEADERS = (b"content-type", b"inference-header-content-length")
MAX_SEGMENT = 100
ENDPOINTS = (
    "v1/models/{name}:predict, v2/models/{name}/infer, invocations and the protocols' "
    "health and metadata paths"
)


@dataclass(frozen=True)
class ModelPath:
    owner: str
    project: str
    model: str
    rest: str  # the protocol's path, from its "/"

    @property
    def prefix(self) -> str:
        return f"/{self.owner}/{self.project}/{self.model}"

    def target(self) -> str:
        """The path the replica gets (quoted again: the router saw it decoded)."""
        return quote(self.rest, safe="/:")


def parse(path: str) -> ModelPath:
    """The model and the protocol path in ``path`` (within the model service), or
    ``CallFailed(404)`` saying what the service answers."""
    owner, _, tail = path.lstrip("/").partition("/")
    project, _, tail = tail.partition("/")
    model, slash, rest = tail.partition("/")
    names = (owner, project, model)
    if not all(names) or any(len(n) > MAX_SEGMENT for n in names) or not slash or not rest:
        raise CallFailed(
            404,
            "no such endpoint: the model service answers POST /model (CML) and "
            f"/{{owner}}/{{project}}/{{model}}/... ({ENDPOINTS})",
        )
    return ModelPath(owner, project, model, "/" + rest)


def problem(rest: str, status: int, detail: str) -> bytes:
    """A refusal of a call to the protocol path ``rest``: problem+json with the protocol's
    own error members."""
    payload: dict[str, Any] = {
        "type": "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **model_protocols.error_payload(rest, status, detail),
    }
    return json.dumps(payload, separators=(",", ":")).encode()
