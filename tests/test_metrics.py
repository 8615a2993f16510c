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
