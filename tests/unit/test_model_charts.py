"""The model page's plots: geometry from request statistics, drawn inline by the template."""

from __future__ import annotations

import datetime as dt

from kiln.domain import model_stats
from kiln.domain.model_stats import Point, Tally
from kiln.web import model_charts
from kiln.web.model_charts import chart, request_charts

START = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def points(calls: list[int], ms: float = 20.0) -> list[Point]:
    found = []
    for i, n in enumerate(calls):
        tally = Tally()
        for _ in range(n):
            tally.count(model_stats.OK, ms)
        found.append(Point(START + dt.timedelta(minutes=i), tally))
    return found


def test_no_calls_is_an_empty_chart_said_so() -> None:
    rate, latency, errors = request_charts(points([0] * 60), 1)
    assert latency.empty and latency.lines[0].segments == ()  # no latency without calls
    assert "no calls in this period" in latency.summary
    assert [t.label for t in rate.y_ticks] == ["0", "0.5", "1"]
    assert [t.label for t in rate.x_ticks] == ["12:00", "12:30", "12:59"]
    assert [t.anchor for t in rate.x_ticks] == ["start", "middle", "end"]
    assert len(errors.lines) == 3


def test_lines_break_where_there_were_no_calls_and_the_axis_is_round() -> None:
    series = points([3, 0, 7, 12])
    rate, latency, _ = request_charts(series, 1)
    assert len(rate.lines[0].segments) == 1 and rate.lines[0].last == "12"
    assert rate.y_ticks[-1].label == "20"  # 12 calls/min: the axis tops at 20
    assert len(latency.lines[0].segments) == 2  # the empty minute splits p50's line
    for x_y in rate.lines[0].segments[0].split():
        x, y = (float(v) for v in x_y.split(","))
        assert model_charts.LEFT <= x <= model_charts.WIDTH
        assert model_charts.TOP <= y <= model_charts.HEIGHT - model_charts.BOTTOM
    assert "now calls 12 per min" in rate.summary


def test_one_point_is_drawn_in_the_middle() -> None:
    one = chart("Requests", "per min", points([1]), [("calls", "line-calls", [1.0])])
    [segment] = one.lines[0].segments
    x = float(segment.split(",")[0])
    assert (
        abs(
            x
            - (
                model_charts.LEFT
                + (model_charts.WIDTH - model_charts.LEFT - model_charts.RIGHT) / 2
            )
        )
        < 1
    )
