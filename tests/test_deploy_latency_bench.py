"""benchmarks/deploy_latency.py's comparison with `robopolicy eval`: paired by seed, not by position."""

import pytest
from conftest import load_benchmark


def test_deployment_is_paired_with_eval_seed_by_seed():
    bench = load_benchmark("deploy_latency")
    reference = {"by_seed": {"100000": True, "100001": True, "100002": False, "100003": True, "100004": False}}
    # the deployment ran the first four seeds; listed in another order, which must not matter
    case = {"by_seed": {"100003": True, "100000": False, "100002": True, "100001": True}}
    paired = bench.paired(case, reference)
    assert paired["episodes"] == 4  # seed 100004 ran in eval only: not a pair
    assert (paired["both"], paired["deploy_only"], paired["eval_only"], paired["neither"]) == (2, 1, 1, 0)
    assert paired["difference"] == 0.0 and paired["mcnemar_p"] == 1.0
    lo, hi = paired["difference_ci95"]
    assert -1.0 <= lo < 0.0 < hi <= 1.0
    worse = bench.paired({"by_seed": {s: False for s in reference["by_seed"]}}, reference)
    assert worse["eval_only"] == 3 and worse["difference"] == pytest.approx(-0.6)
