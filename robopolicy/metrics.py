"""Success-rate statistics."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well-behaved at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def success_summary(successes: list[bool]) -> dict[str, float]:
    n, k = len(successes), int(sum(successes))
    lo, hi = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else 0.0,
            "success_ci95": [round(lo, 4), round(hi, 4)]}


def mean_success_summary(groups: list[dict]) -> dict:
    """The unweighted mean of several groups' success rates (per task, per goal) with a 95% Wilson interval at the
    mean's effective sample size K^2 / sum(1 / n_k): the n for which one binomial has the variance of the mean of K
    equal rates measured on n_1 .. n_K episodes (the total n when every group has as many)."""
    groups = [g for g in groups if g["episodes"]]
    if not groups:
        return {"groups": 0, "success_rate": 0.0, "success_ci95": [0.0, 1.0]}
    rate = sum(g["success_rate"] for g in groups) / len(groups)
    n_eff = len(groups) ** 2 / sum(1.0 / g["episodes"] for g in groups)
    lo, hi = wilson_interval(rate * n_eff, n_eff)  # type: ignore[arg-type]  (a real-valued count is fine here)
    return {"groups": len(groups), "success_rate": rate, "success_ci95": [round(lo, 4), round(hi, 4)]}
