"""Mutual TLS and identity authorization on a real gRPC server, with real certificates.

Every refusal also checks the servicer never ran: a refused call must not reach the code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiln.pki.ca import issue_certificate, issue_service_certificate, make_ca
from kiln.rpc import runner_pb2, runner_pb2_grpc
from kiln.rpc.authz import RUNNER_POLICY, check_policy_covers
from kiln.rpc.identity import BUILDER, RUNNER, WEB, CertFiles, Service
from kiln.rpc.testing import EchoRunner, TestPki, running_runner
from kiln.rpc.tls import ServiceChannel

TIMEOUT = 10


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path / "pki")


@pytest.fixture
def echo() -> EchoRunner:
    return EchoRunner()


@pytest.fixture
def runner_port(pki: TestPki, echo: EchoRunner) -> Iterator[int]:
    with running_runner(pki.files(Service.RUNNER), echo) as port:
        yield port


@contextmanager
def stub_for(
    port: int, files: CertFiles, server: Service = Service.RUNNER
) -> Iterator[runner_pb2_grpc.RunnerStub]:
    with ServiceChannel(f"127.0.0.1:{port}", server, files) as channel:
        yield runner_pb2_grpc.RunnerStub(channel.get())


@pytest.fixture
def as_web(pki: TestPki, runner_port: int) -> Iterator[runner_pb2_grpc.RunnerStub]:
    with stub_for(runner_port, pki.files(Service.WEB)) as stub:
        yield stub


@pytest.fixture
def as_builder(pki: TestPki, runner_port: int) -> Iterator[runner_pb2_grpc.RunnerStub]:
    with stub_for(runner_port, pki.files(Service.BUILDER)) as stub:
        yield stub


def call_all_kinds(stub: runner_pb2_grpc.RunnerStub) -> dict[str, Any]:
    """One call of each RPC shape the interceptor must guard."""
    status = stub.GetStatus(runner_pb2.GetStatusRequest(workload_id="w1"), timeout=TIMEOUT)
    logs = b"".join(
        c.data
        for c in stub.StreamLogs(runner_pb2.StreamLogsRequest(workload_id="w1"), timeout=TIMEOUT)
    )
    inputs = [
        runner_pb2.ExecInput(start=runner_pb2.ExecStart(workload_id="w1", tty=True)),
        runner_pb2.ExecInput(stdin=b"echo hi\n"),
        runner_pb2.ExecInput(close_stdin=True),
    ]
    outputs = list(stub.Exec(iter(inputs), timeout=TIMEOUT))
    return {"status": status, "logs": logs, "exec": outputs}


def refused_code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def ping_refusal(stub: runner_pb2_grpc.RunnerStub) -> grpc.StatusCode:
    return refused_code(lambda: stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT))


def test_the_right_identity_may_call_every_rpc(
    as_web: runner_pb2_grpc.RunnerStub, echo: EchoRunner
) -> None:
    reply = as_web.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT)
    assert (reply.server_identity, reply.caller_identity) == (RUNNER, WEB)

    results = call_all_kinds(as_web)

    assert results["status"].state == runner_pb2.WORKLOAD_STATE_RUNNING
    assert results["logs"] == b"hello\nworld\n"
    assert [o.WhichOneof("output") for o in results["exec"]] == ["stdout", "exit"]
    assert echo.calls == [("Ping", WEB), ("GetStatus", WEB), ("StreamLogs", WEB), ("Exec", WEB)]


def test_no_client_certificate_is_refused_at_the_handshake(
    pki: TestPki, runner_port: int, echo: EchoRunner
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    options = [("grpc.ssl_target_name_override", Service.RUNNER.dns_name)]
    with grpc.secure_channel(f"127.0.0.1:{runner_port}", creds, options=options) as channel:
        stub = runner_pb2_grpc.RunnerStub(channel)
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_a_plaintext_client_is_refused(runner_port: int, echo: EchoRunner) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{runner_port}") as channel:
        stub = runner_pb2_grpc.RunnerStub(channel)
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_a_certificate_from_another_ca_is_refused(
    pki: TestPki, runner_port: int, echo: EchoRunner
) -> None:
    # Same identity, same shape, right usages: only the signer differs.
    other_ca = make_ca("Somebody else's CA")
    files = pki.write("foreign-web", issue_service_certificate(other_ca, "web"), ca=other_ca)
    with stub_for(runner_port, files) as stub:
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_an_expired_certificate_is_refused(
    pki: TestPki, runner_port: int, echo: EchoRunner
) -> None:
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    leaf = issue_service_certificate(pki.ca, "web", lifetime=dt.timedelta(days=1), now=two_days_ago)
    files = pki.write("expired-web", leaf)
    with stub_for(runner_port, files) as stub:
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_a_server_only_certificate_cannot_act_as_a_client(
    pki: TestPki, runner_port: int, echo: EchoRunner
) -> None:
    # The public HTTPS certificate is signed by the same CA but lacks the clientAuth usage.
    leaf = issue_certificate(pki.ca, "web-server", [WEB, "localhost"], server=True, client=False)
    with stub_for(runner_port, pki.write("web-server", leaf)) as stub:
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_the_wrong_identity_gets_permission_denied(
    as_builder: runner_pb2_grpc.RunnerStub, echo: EchoRunner
) -> None:
    # Ping is open to every Kiln service, which proves the builder's TLS handshake succeeded.
    assert as_builder.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity == BUILDER

    assert refused_code(lambda: call_all_kinds(as_builder)) == grpc.StatusCode.PERMISSION_DENIED
    logs = as_builder.StreamLogs(runner_pb2.StreamLogsRequest(workload_id="w1"), timeout=TIMEOUT)
    assert refused_code(lambda: list(logs)) == grpc.StatusCode.PERMISSION_DENIED
    exec_ = as_builder.Exec(iter([runner_pb2.ExecInput(stdin=b"x")]), timeout=TIMEOUT)
    assert refused_code(lambda: list(exec_)) == grpc.StatusCode.PERMISSION_DENIED
    assert echo.calls == [("Ping", BUILDER)]


@pytest.mark.parametrize(
    "sans",
    [
        ["runner.kiln.internal"],
        ["spiffe://kiln/web", "spiffe://kiln/runner"],
        ["spiffe://other/web"],
    ],
    ids=["no-spiffe-id", "two-identities", "foreign-trust-domain"],
)
def test_a_valid_certificate_without_exactly_one_kiln_identity_is_unauthenticated(
    pki: TestPki, runner_port: int, echo: EchoRunner, sans: list[str]
) -> None:
    leaf = issue_certificate(pki.ca, "odd", sans, server=True, client=True)
    with stub_for(runner_port, pki.write("odd", leaf)) as stub:
        code = refused_code(lambda: stub.GetStatus(runner_pb2.GetStatusRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert echo.calls == []


def test_the_client_refuses_a_server_with_another_identity(pki: TestPki, echo: EchoRunner) -> None:
    # A builder certificate (valid, same CA) where the web tier expects the runner.
    with running_runner(pki.files(Service.BUILDER), echo) as port:
        with stub_for(port, pki.files(Service.WEB), server=Service.RUNNER) as stub:
            assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
        # The same server is fine for a client that expects the builder.
        with stub_for(port, pki.files(Service.WEB), server=Service.BUILDER) as stub:
            assert stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity == WEB
    assert echo.calls == [("Ping", WEB)]


def test_the_client_refuses_an_expired_server_certificate(pki: TestPki, echo: EchoRunner) -> None:
    two_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    leaf = issue_service_certificate(
        pki.ca, "runner", lifetime=dt.timedelta(days=1), now=two_days_ago
    )
    with (
        running_runner(pki.write("expired-runner", leaf), echo) as port,
        stub_for(port, pki.files(Service.WEB)) as stub,
    ):
        assert ping_refusal(stub) == grpc.StatusCode.UNAVAILABLE
    assert echo.calls == []


def test_a_method_missing_from_the_policy_is_denied_to_everyone(
    pki: TestPki, echo: EchoRunner
) -> None:
    policy = {m: ids for m, ids in RUNNER_POLICY.items() if not m.endswith("/GetStatus")}
    with (
        running_runner(pki.files(Service.RUNNER), echo, policy) as port,
        stub_for(port, pki.files(Service.WEB)) as stub,
    ):
        assert stub.Ping(runner_pb2.PingRequest(), timeout=TIMEOUT).caller_identity == WEB
        code = refused_code(lambda: stub.GetStatus(runner_pb2.GetStatusRequest(), timeout=TIMEOUT))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert echo.calls == [("Ping", WEB)]


def test_the_policy_table_must_name_every_rpc_exactly() -> None:
    runner = runner_pb2.DESCRIPTOR.services_by_name["Runner"]
    check_policy_covers(RUNNER_POLICY, runner)  # the shipped table is complete
    incomplete = {m: ids for m, ids in RUNNER_POLICY.items() if not m.endswith("/Exec")}
    with pytest.raises(ValueError, match="Exec"):
        check_policy_covers(incomplete, runner)
    with pytest.raises(ValueError, match="Nope"):
        check_policy_covers({**RUNNER_POLICY, "/kiln.runner.v1.Runner/Nope": frozenset()}, runner)
