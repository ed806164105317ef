"""Request statistics of models, the pure part: outcomes, histogram buckets, percentiles
read from histograms, and the counts of calls as they add up."""

from __future__ import annotations

import itertools
import random

import pytest

from kiln.db.model_stats_models import HISTOGRAM_SIZE
from kiln.domain import model_stats
from kiln.domain.model_stats import BOUNDS_MS, Tally, bucket, outcome, percentile


def test_outcomes_tell_the_models_errors_from_the_routers() -> None:
    assert outcome(200, answered_by_replica=True) == model_stats.OK
    assert outcome(400, answered_by_replica=True) == model_stats.CLIENT_ERROR
    assert outcome(500, answered_by_replica=True) == model_stats.SERVER_ERROR
    # The router's own answers (no replica in time, timeout, replica died) are refusals,
    # whatever their number.
    for status in (502, 503, 504, 404):
        assert outcome(status, answered_by_replica=False) == model_stats.REFUSED


def test_the_buckets_are_log_spaced_and_fixed() -> None:
    assert len(BOUNDS_MS) == HISTOGRAM_SIZE - 1  # and one bucket beyond the top bound
    assert BOUNDS_MS[0] == 0.5 and 90_000 < BOUNDS_MS[-1] < 95_000  # past the call timeout
    ratios = {round(b / a, 6) for a, b in itertools.pairwise(BOUNDS_MS)}
    assert ratios == {round(2**0.5, 6)}
    assert bucket(0.0) == 0 and bucket(0.5) == 0 and bucket(0.51) == 1
    assert bucket(BOUNDS_MS[10]) == 10 and bucket(BOUNDS_MS[10] * 1.01) == 11
    assert bucket(10**9) == HISTOGRAM_SIZE - 1


def test_percentiles_from_a_histogram_are_within_a_bucket_of_the_truth() -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(3.0, 0.8) for _ in range(5000)]  # ms, median ~20
    tally = Tally()
    for ms in latencies:
        tally.count(model_stats.OK, ms)
    ordered = sorted(latencies)
    for q in (0.5, 0.95):
        truth = ordered[int(q * len(ordered)) - 1]
        estimate = tally.percentile(q)
        assert estimate is not None
        assert truth / 2**0.5 <= estimate <= truth * 2**0.5, (q, truth, estimate)
    assert tally.calls == 5000 and tally.errors == 0
    assert tally.mean_ms == pytest.approx(sum(latencies) / 5000)


def test_percentiles_of_edge_cases() -> None:
    assert percentile([0] * HISTOGRAM_SIZE, 0.5) is None
    one = Tally()
    one.count(model_stats.OK, 3.0)  # bucket (2.83, 4]
    p50 = one.percentile(0.5)
    assert p50 is not None and BOUNDS_MS[5] <= p50 <= BOUNDS_MS[6]
    slow = Tally()
    slow.count(model_stats.REFUSED, 200_000.0)  # beyond the top bound: counted as the bound
    assert slow.percentile(0.95) == BOUNDS_MS[-1] and slow.refusals == 1


def test_tallies_add_up_like_the_rows_do() -> None:
    a, b = Tally(), Tally()
    for ms in (1.0, 2.0, 400.0):
        a.count(model_stats.OK, ms)
    b.count(model_stats.CLIENT_ERROR, 5.0)
    b.count(model_stats.SERVER_ERROR, 5.0)
    b.count(model_stats.REFUSED, 30_000.0)
    a.add(b)
    assert (a.calls, a.client_errors, a.server_errors, a.refusals) == (6, 1, 1, 1)
    assert a.errors == 3 and sum(a.histogram) == 6
    assert a.latency_ms_sum == pytest.approx(30_413.0)
