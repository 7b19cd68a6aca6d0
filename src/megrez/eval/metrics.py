"""Scores with their uncertainty: accuracy with a Wilson interval, pass@k (the unbiased
estimator of the Codex paper), and a normal interval over per-item scores when an item has
several samples (the items, not the samples, are independent).
"""
from __future__ import annotations

import math
from statistics import NormalDist


def z_value(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: stays inside [0, 1] and is sensible at
    0 or n successes, where the normal approximation collapses to a point."""
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): normal interval from the sample standard error of per-item scores."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0, 1.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, 1.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z_value(confidence) * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def stderr(values: list[float]) -> float:
    """Standard error of the mean with the n-1 sample variance (what lm-evaluation-harness reports)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n samples,
    c of them correct, is correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarize(per_item: list[list[float]], ks: tuple[int, ...] = (1,), confidence: float = 0.95) -> dict:
    """per_item[i] = the scores (0/1, or fractions) of item i's samples. Returns accuracy (mean
    over all samples), its interval, the standard error, and pass@k for binary scores."""
    n_items = len(per_item)
    samples = [s for item in per_item for s in item]
    out: dict = {"items": n_items, "samples": len(samples)}
    if not samples:
        return out
    per_sample_count = {len(item) for item in per_item}
    binary = all(s in (0, 1, 0.0, 1.0, True, False) for s in samples)
    if per_sample_count == {1} and binary:
        c = int(sum(samples))
        lo, hi = wilson_interval(c, n_items, confidence)
        out.update(accuracy=c / n_items, ci_low=lo, ci_high=hi, ci="wilson")
        out["stderr"] = stderr([float(s) for s in samples])
    else:
        means = [sum(item) / len(item) for item in per_item if item]
        mean, lo, hi = mean_interval(means, confidence)
        out.update(accuracy=mean, ci_low=lo, ci_high=hi, ci="normal over items", stderr=stderr(means))
    out["confidence"] = confidence
    if binary:
        n_min = min(per_sample_count)
        for k in ks:
            if k <= n_min:
                vals = [pass_at_k(len(item), int(sum(item)), k) for item in per_item]
                mean, lo, hi = mean_interval(vals, confidence)
                if per_sample_count == {1}:  # one answer each: pass@1 is the accuracy, Wilson's interval
                    lo, hi = out["ci_low"], out["ci_high"]
                out[f"pass@{k}"] = mean
                out[f"pass@{k}_ci"] = [lo, hi]
    return out
