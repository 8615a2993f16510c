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


def paired_difference(first: list[bool], second: list[bool], z: float = 1.96) -> dict:
    """Success of `first` minus `second` on the same episodes (pairs: one seed run two ways): the discordant counts,
    the difference with its 95% interval (Newcombe 1998, method 10: both rates' Wilson intervals squared and added
    with the pairs' correlation) and the exact McNemar p-value of "no difference" (the discordant pairs as the
    flips of a fair coin)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}.")
    n = len(first)
    both = sum(1 for x, y in zip(first, second) if x and y)
    first_only = sum(1 for x, y in zip(first, second) if x and not y)
    second_only = sum(1 for x, y in zip(first, second) if y and not x)
    neither = n - both - first_only - second_only
    out = {"episodes": n, "both": both, "first_only": first_only, "second_only": second_only, "neither": neither}
    if n == 0:
        return {**out, "difference": 0.0, "difference_ci95": [-1.0, 1.0], "mcnemar_p": 1.0}
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    l1, u1 = wilson_interval(both + first_only, n, z)
    l2, u2 = wilson_interval(both + second_only, n, z)
    margins = (both + first_only) * (second_only + neither) * (both + second_only) * (first_only + neither)
    # the pairs' correlation, its positive part shrunk by n / 2 (Newcombe's correction; 0 without two outcomes)
    cross = both * neither - first_only * second_only
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    diff = p1 - p2
    below = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    above = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    discordant = first_only + second_only
    tail = sum(math.comb(discordant, i) for i in range(min(first_only, second_only) + 1)) / 2.0 ** discordant
    return {**out, "difference": round(diff, 4),
            "difference_ci95": [round(max(diff - below, -1.0), 4), round(min(diff + above, 1.0), 4)],
            "mcnemar_p": round(min(1.0, 2.0 * tail), 4)}
