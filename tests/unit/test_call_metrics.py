"""A call's metrics as the router takes them off a replica's answer: the split by
``X-Kiln-Metrics-Length`` and the checks of records that come from user code."""

from __future__ import annotations

import json

import pytest

from kiln.domain.model_metrics import parse_replica_records
from kiln.serving.call_metrics import LENGTH_HEADER, split
from kiln.serving.model_server import CallFailed

UUID = "0f0e0d0c-0b0a-4909-8807-060504030201"


def test_the_metrics_are_split_off_the_answer() -> None:
    metrics, answer = b'[{"a":1}]', b'{"success":true}'
    assert split([(b"X-Kiln-Metrics-Length", b"9")], metrics + answer) == (answer, metrics)
    assert split([(LENGTH_HEADER, b"0")], answer) == (answer, b"")
    assert split([], answer) == (answer, b"")  # a replica built before metrics existed
    for bad in (b"99", b"-1", b"x"):
        with pytest.raises(CallFailed) as info:
            split([(LENGTH_HEADER, bad)], answer)
        assert info.value.status == 502


def record(**changes: object) -> dict[str, object]:
    return {"uuid": UUID, "start_ms": 1, "end_ms": 2, "metrics": {"a": 1}, **changes}


def test_records_from_a_replica_are_checked() -> None:
    (found,) = parse_replica_records(json.dumps([record()]).encode())
    assert (found.uuid, found.start_ms, found.end_ms, found.metrics) == (UUID, 1, 2, {"a": 1})
    bad = [
        b"{}",
        b"not json",
        json.dumps([record()] * 17).encode(),
        json.dumps([record(uuid="nope")]).encode(),
        json.dumps([record(uuid=None)]).encode(),
        json.dumps([record(start_ms="1")]).encode(),
        json.dumps([record(end_ms=True)]).encode(),
        json.dumps([record(start_ms=-5)]).encode(),
        json.dumps([record(metrics=[1])]).encode(),
        json.dumps([record(metrics={"": 1})]).encode(),
        json.dumps([record(metrics={"a": "x" * 70_000})]).encode(),
        b"[" + b" " * 90_000 + b"]",
    ]
    for payload in bad:
        with pytest.raises(ValueError):
            parse_replica_records(payload)
