"""The model page's plots as inline SVG drawn on the server: the UI has no chart library
and its Content-Security-Policy admits no CDN, and three line charts do not need one.

Pure functions from request statistics (``kiln.domain.model_stats.Point``) to geometry that
``templates/models/_chart.html`` draws; the numbers are all the template puts in the SVG.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.domain.model_stats import Point

WIDTH, HEIGHT = 360.0, 170.0  # drawn about this size: its text keeps its size
LEFT, RIGHT, TOP, BOTTOM = 44.0, 6.0, 10.0, 22.0
RANGES = {  # name: (minutes shown, minutes per point, label)
    "hour": (60, 1, "last hour"),
    "day": (24 * 60, 15, "last day"),
}


@dataclass(frozen=True)
class Line:
    label: str
    css: str  # the stroke's class in models.css
    segments: tuple[str, ...]  # SVG polyline points; a gap (no calls) splits the line
    last: str  # the newest value, as shown in the legend


@dataclass(frozen=True)
class Tick:
    at: float  # the coordinate (y for values, x for times)
    label: str
    anchor: str = "middle"  # SVG text-anchor: the first and last times stay inside


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    summary: str  # for screen readers and the title attribute
    lines: tuple[Line, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    empty: bool
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    right_edge: float = WIDTH - RIGHT
    top: float = TOP
    bottom_edge: float = HEIGHT - BOTTOM


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def _x(index: int, count: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + (span * index / (count - 1) if count > 1 else span / 2)


def _y(value: float, top: float) -> float:
    span = HEIGHT - TOP - BOTTOM
    return HEIGHT - BOTTOM - span * (value / top if top else 0.0)


def _segments(values: list[float | None], top: float) -> tuple[str, ...]:
    segments: list[str] = []
    current: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            if current:
                segments.append(" ".join(current))
            current = []
            continue
        current.append(f"{_x(i, len(values)):.1f},{_y(value, top):.1f}")
    if current:
        segments.append(" ".join(current))
    return tuple(segments)


def _nice_top(peak: float) -> float:
    """A round number at or above ``peak`` for the top of the y axis."""
    if peak <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(peak))) / 10 if peak >= 1 else 0.1
    while magnitude > peak:
        magnitude /= 10
    for step in (1, 2, 2.5, 5, 10):
        if magnitude * step >= peak:
            return magnitude * step
    return magnitude * 10


def chart(
    title: str, unit: str, points: list[Point], series: list[tuple[str, str, list[float | None]]]
) -> Chart:
    """A line chart of ``series`` ((label, css class, one value per point)) over the times of
    ``points``."""
    values = [v for _, _, vs in series for v in vs if v is not None]
    top = _nice_top(max(values, default=0.0))
    lines = tuple(
        Line(
            label,
            css,
            _segments(vs, top),
            next((_number(v) for v in reversed(vs) if v is not None), "—"),
        )
        for label, css, vs in series
    )
    y_ticks = tuple(Tick(_y(top * f, top), _number(top * f)) for f in (0.0, 0.5, 1.0))
    count = len(points)
    marks = sorted({0, count // 2, count - 1}) if count else []
    anchors = {0: "start", count - 1: "end"}
    x_ticks = tuple(
        Tick(_x(i, count), points[i].at.strftime("%H:%M"), anchors.get(i, "middle")) for i in marks
    )
    legend = ", ".join(f"{line.label} {line.last} {unit}" for line in lines)
    summary = f"{title}: now {legend}" if values else f"{title}: no calls in this period"
    return Chart(title, unit, summary, lines, y_ticks, x_ticks, empty=not values)


def request_charts(points: list[Point], step_minutes: int) -> list[Chart]:
    """Request rate, latency (p50 and p95) and errors of a series of request statistics."""
    per_minute = [p.tally.calls / step_minutes for p in points]
    rate = chart("Requests", "per min", points, [("calls", "line-calls", list(per_minute))])
    latency = chart(
        "Latency",
        "ms",
        points,
        [
            ("p50", "line-p50", [p.tally.percentile(0.5) for p in points]),
            ("p95", "line-p95", [p.tally.percentile(0.95) for p in points]),
        ],
    )

    def rate_of(count: int) -> float:
        return count / step_minutes

    errors = chart(
        "Errors",
        "per min",
        points,
        [
            ("4xx from the model", "line-client", [rate_of(p.tally.client_errors) for p in points]),
            ("5xx from the model", "line-server", [rate_of(p.tally.server_errors) for p in points]),
            ("refused by the router", "line-refused", [rate_of(p.tally.refusals) for p in points]),
        ],
    )
    return [rate, latency, errors]
