"""Per-RPC authorization on the caller's verified SPIFFE identity.

TLS has already proved the peer holds a key for a certificate from Kiln's CA; this layer
decides what that identity may call. The table is default-deny: a method without an entry is
refused for everyone, so a new RPC is unreachable until someone decides who may call it (and
``check_policy_covers`` makes a forgotten entry fail a test rather than stay silently closed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from cryptography import x509

from kiln.pki.ca import spiffe_ids
from kiln.rpc import builder_pb2, runner_pb2
from kiln.rpc.identity import ANY_SERVICE, WEB

# Full method name ("/package.Service/Method") → SPIFFE ids allowed to call it.
Policy = Mapping[str, frozenset[str]]

_RUNNER = "/kiln.runner.v1.Runner/"
RUNNER_POLICY: Policy = {
    _RUNNER + "Ping": ANY_SERVICE,
    _RUNNER + "StartWorkload": frozenset({WEB}),
    _RUNNER + "StopWorkload": frozenset({WEB}),
    _RUNNER + "GetStatus": frozenset({WEB}),
    _RUNNER + "Wake": frozenset({WEB}),
    _RUNNER + "StreamLogs": frozenset({WEB}),
    _RUNNER + "Exec": frozenset({WEB}),
}


def service_methods(service: Any) -> set[str]:
    """Full method names of a protobuf ServiceDescriptor."""
    return {f"/{service.full_name}/{m.name}" for m in service.methods}


def check_policy_covers(policy: Policy, *services: Any) -> None:
    """Raise if ``policy`` names a method the services lack, or misses one they have."""
    methods = set().union(*(service_methods(s) for s in services))
    missing, unknown = methods - policy.keys(), policy.keys() - methods
    if missing or unknown:
        raise ValueError(f"policy misses {sorted(missing)}; names unknown {sorted(unknown)}")


_BUILDER = "/kiln.builder.v1.Builder/"
BUILDER_POLICY: Policy = {
    _BUILDER + "Ping": ANY_SERVICE,
    _BUILDER + "Wake": frozenset({WEB}),
    _BUILDER + "StreamBuildLog": frozenset({WEB}),
}


check_policy_covers(RUNNER_POLICY, runner_pb2.DESCRIPTOR.services_by_name["Runner"])
check_policy_covers(BUILDER_POLICY, builder_pb2.DESCRIPTOR.services_by_name["Builder"])


@functools.lru_cache(maxsize=256)
def _identity_of_pem(pem: bytes) -> str | None:
    ids = spiffe_ids(x509.load_pem_x509_certificate(pem))
    # Exactly one: a certificate naming two identities would let its holder pick either.
    return ids[0] if len(ids) == 1 else None


def caller_identity(context: grpc.ServicerContext) -> str | None:
    """The SPIFFE id in the verified client certificate of this call, or None.

    Read from the certificate itself (``x509_pem_cert``), not from gRPC's derived
    ``peer_spiffe_id`` property, so the rule "exactly one spiffe://kiln/ URI" is ours."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if len(pems) != 1:
        return None
    try:
        return _identity_of_pem(pems[0])
    except ValueError:
        return None


def _guarded(behavior: Callable[..., Any], method: str, allowed: frozenset[str]) -> Any:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        identity = caller_identity(context)
        if identity is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no Kiln service identity in the client certificate",
            )
        if identity not in allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{identity} may not call {method}")
        return behavior(request, context)

    return guarded


_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class IdentityAuthorization(grpc.ServerInterceptor):
    """Server interceptor enforcing ``policy``. It wraps the method handler rather than
    deciding in ``intercept_service`` because only the handler's context carries the peer
    certificate."""

    def __init__(self, policy: Policy) -> None:
        self.policy = dict(policy)

    def intercept_service(
        self,
        continuation: Callable[[Any], Any],
        handler_call_details: Any,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method: str = handler_call_details.method
        allowed = self.policy.get(method, frozenset())
        for kind, factory in _HANDLER_FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    _guarded(behavior, method, allowed),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
