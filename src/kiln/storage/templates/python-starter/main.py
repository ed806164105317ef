"""Fits a straight line to noisy points with plain Python: no packages needed."""

import random
import statistics


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    slope, intercept = statistics.linear_regression(xs, ys)
    return slope, intercept


if __name__ == "__main__":
    rng = random.Random(42)
    xs = [float(x) for x in range(20)]
    ys = [3.0 * x + 2.0 + rng.gauss(0, 1) for x in xs]
    slope, intercept = fit_line(xs, ys)
    print(f"y = {slope:.2f} x + {intercept:.2f}")
