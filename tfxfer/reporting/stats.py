"""Summaries of repeated runs and paired comparisons between strategies.

`summarize`: mean, sample standard deviation and a t-distribution confidence
interval. `paired`: the per-pair differences of two strategies run on the same
seeds (and folds), with a two-sided paired t-test. Folds of one dataset share
training images, so treating seed x fold pairs as independent makes the
p-values optimistic (Nadeau & Bengio, 2003); the study report says so.
"""

import dataclasses
import math
import warnings

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["Summary", "Comparison", "summarize", "paired", "describe", "MIN_PAIRS"]

# The fewest paired runs (seeds × folds) a paired t-test is run on.
MIN_PAIRS = 3


@dataclasses.dataclass
class Summary:
    n: int
    mean: float
    sd: float  # NaN for a single value
    ci_low: float
    ci_high: float


@dataclasses.dataclass
class Comparison:
    n: int
    mean_difference: float  # a - b
    sd: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired t-test; NaN with fewer than MIN_PAIRS pairs or no spread
    test: str = "paired t-test"

    def significant(self, level=0.05):
        return bool(self.p_value < level)


def summarize(values, confidence=0.95):
    """`Summary` of `values`: the CI is mean ± t(n-1) · sd / sqrt(n)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        raise ValueError("summarize() needs at least one value.")
    mean = float(values.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(values.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired(a, b, confidence=0.95):
    """`Comparison` of `a - b`, element by element (the same seed/fold in each)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired() needs values for the same runs; got {len(a)} and {len(b)}.")
    summary = summarize(a - b, confidence)
    p_value = math.nan
    # Two pairs, or differences that do not vary (two seeds off by the same images), leave a t-test
    # nothing to stand on: no p-value rather than a made-up one.
    if summary.n >= MIN_PAIRS and summary.sd > 1e-12 * max(1.0, abs(summary.mean)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision-loss notice
            p_value = float(scipy_stats.ttest_rel(a, b).pvalue)
    return Comparison(summary.n, summary.mean, summary.sd, summary.ci_low, summary.ci_high, p_value)


def describe(name, other, comparison, runs, level=0.05, unit=100.0, what="points"):
    """One plain-language line for `comparison` (of `name` against `other`),
    differences in `what` (`unit` times the metric: accuracy points)."""
    d, sd = comparison.mean_difference * unit, comparison.sd * unit
    if comparison.n < MIN_PAIRS:
        return (f"{name} vs {other}: {d:+.1f} {what} from {runs}; too few paired runs for a test "
                f"(it needs {MIN_PAIRS}), so nothing is concluded.")
    if math.isnan(comparison.p_value):
        return (f"{name} vs {other}: {d:+.1f} {what} in every pair of {runs}; differences that never vary "
                "give a paired t-test nothing to stand on, so nothing is concluded.")
    p = f"p = {comparison.p_value:.2g}" if comparison.p_value >= 0.001 else "p < 0.001"
    spread = f"{abs(d):.1f} ± {sd:.1f} {what}"
    if comparison.significant(level):
        verb = "beats" if d > 0 else "is worse than"
        return f"{name} {verb} {other} by {spread} ({p}, {runs})."
    return f"{name} vs {other}: no significant difference ({d:+.1f} ± {sd:.1f} {what}, {p}, {runs})."
