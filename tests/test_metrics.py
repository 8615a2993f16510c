import pytest

from robopolicy.metrics import success_summary, wilson_interval


def test_wilson_interval_known_values():
    # Reference values from the closed-form Wilson score interval (z = 1.96).
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-3)


def test_success_summary_counts():
    s = success_summary([True, False, True, True])
    assert s["episodes"] == 4 and s["successes"] == 3 and s["success_rate"] == 0.75
    assert s["success_ci95"][0] < 0.75 < s["success_ci95"][1]


def test_mean_over_groups_has_a_wilson_interval_at_its_effective_sample_size():
    from robopolicy.metrics import mean_success_summary

    equal = [success_summary([True] * 9 + [False]), success_summary([True] * 7 + [False] * 3)]
    mean = mean_success_summary(equal)
    assert mean["groups"] == 2 and mean["success_rate"] == pytest.approx(0.8)
    # equal group sizes: the interval of the pooled 16 of 20
    assert mean["success_ci95"] == [round(v, 4) for v in wilson_interval(16, 20)]
    # a small group widens the interval of the mean more than its share of the episodes would
    uneven = mean_success_summary([success_summary([True] * 18), success_summary([False, False])])
    assert uneven["success_rate"] == pytest.approx(0.5)
    n_eff = 4 / (1 / 18 + 1 / 2)
    assert uneven["success_ci95"] == [round(v, 4) for v in wilson_interval(0.5 * n_eff, n_eff)]
    assert uneven["success_ci95"][1] - uneven["success_ci95"][0] > 0.4
    assert mean_success_summary([]) == {"groups": 0, "success_rate": 0.0, "success_ci95": [0.0, 1.0]}


def test_paired_difference_counts_discordant_pairs_and_matches_newcombes_interval():
    from robopolicy.metrics import paired_difference

    # Newcombe's square-and-add interval (method 10) on Cavo et al. 2012 as Fagerland, Lydersen & Laake's
    # contingencytables package reports it: 59 both, 6 first only, 16 second only, 80 neither
    first = [True] * 59 + [True] * 6 + [False] * 16 + [False] * 80
    second = [True] * 59 + [False] * 6 + [True] * 16 + [False] * 80
    d = paired_difference(first, second)
    assert (d["both"], d["first_only"], d["second_only"], d["neither"]) == (59, 6, 16, 80)
    assert d["difference"] == pytest.approx(-0.0621, abs=1e-4)
    assert d["difference_ci95"] == pytest.approx([-0.1186, -0.0046], abs=1e-4)
    assert d["mcnemar_p"] == pytest.approx(0.0525, abs=1e-4)  # 6 of 22 discordant pairs, two-sided exact binomial
    # the same seeds succeeding both ways: no difference, and a narrower interval than two unpaired runs would give
    same = paired_difference([True] * 85 + [False] * 15, [True] * 85 + [False] * 15)
    assert same["difference"] == 0.0 and same["mcnemar_p"] == 1.0
    lo, hi = same["difference_ci95"]
    assert -0.06 < lo < 0.0 < hi < 0.06
    shuffled = paired_difference([True] * 85 + [False] * 15, [False] * 15 + [True] * 85)  # no pairing at all
    assert shuffled["difference"] == 0.0 and shuffled["difference_ci95"][1] - shuffled["difference_ci95"][0] > hi - lo
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([True], [True, False])
