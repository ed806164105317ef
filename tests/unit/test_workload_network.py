"""The site's egress policy for workloads, as the runner builds it from settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from kiln.runner.process import workload_network
from kiln.settings import Settings


def settings(**runner: object) -> Settings:
    return Settings(env="test", data_dir=Path("/nonexistent"), runner=runner)  # type: ignore[arg-type]


def test_egress_by_default_never_to_link_local() -> None:
    policy = workload_network(settings())
    assert policy.egress and policy.wants_network
    assert [str(rule.network) for rule in policy.deny] == ["169.254.0.0/16"]


def test_the_site_can_turn_egress_off_and_deny_more() -> None:
    policy = workload_network(
        settings(workload_egress=False, workload_egress_deny=["10.0.0.0/8", "192.0.2.7:5432"])
    )
    assert not policy.egress and not policy.wants_network
    assert policy.deny[0].network == ipaddress.IPv4Network("10.0.0.0/8")
    assert policy.deny[1].port == 5432


def test_a_host_without_sandbox_networking_runs_workloads_without_one() -> None:
    assert not workload_network(settings(), can_network=False).egress
