"""stats.py against printed t tables, closed forms of the t distribution and intervals worked by hand."""

import math
import random

import pytest

from gptlab import stats
from gptlab.stats import betainc, confidence_interval, mean, paired_t_test, std, t_cdf, t_quantile, t_two_sided_p


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


@pytest.mark.parametrize("t", [-7.0, -1.0, -0.2, 0.0, 0.5, 3.0, 40.0])
def test_t_cdf_equals_closed_forms_for_one_and_two_degrees_of_freedom(t):
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi.
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)


def test_quantile_inverts_the_cdf_in_both_tails():
    for df in (1, 3, 7.5, 100):
        for p in (0.001, 0.1, 0.5, 0.9, 0.999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, rel=1e-10)
    # df = 2 in closed form: t_p = (2p - 1) sqrt(2 / (4 p (1 - p))); at p = 0.975, 0.95 * sqrt(2 / 0.0975).
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / 0.0975), rel=1e-10)


def test_p_value_of_a_known_case():
    # The table's t_{0.975, 10} = 2.228139 leaves 2.5% in each tail: two-sided p = 0.05.
    assert t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-6)
    # Cauchy: P(|T| > 1) = 1 - 2 atan(1) / pi = 0.5 exactly.
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, rel=1e-12)


def test_incomplete_beta_special_cases():
    # I_x(1, 1) = x (uniform); I_x(a, 1) = x^a; I_x(a, b) = 1 - I_{1-x}(b, a).
    assert betainc(1, 1, 0.3) == pytest.approx(0.3, rel=1e-12)
    assert betainc(2.5, 1, 0.4) == pytest.approx(0.4 ** 2.5, rel=1e-12)
    assert betainc(3, 7, 0.2) == pytest.approx(1 - betainc(7, 3, 0.8), rel=1e-12)


def test_mean_and_sample_std():
    # [2, 4, 4, 4, 5, 5, 7, 9]: mean 5, squared deviations sum to 32, sample variance 32 / 7.
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    assert mean(values) == 5
    assert std(values) == pytest.approx(math.sqrt(32 / 7), rel=1e-12)
    assert math.isnan(std([1.0]))


def test_confidence_interval_worked_by_hand():
    # [1, 2, 3, 4, 5]: mean 3, s^2 = (4 + 1 + 0 + 1 + 4) / 4 = 2.5, s / sqrt(5) = sqrt(0.5) = 0.7071068;
    # t_{0.975, 4} = 2.7764451, so the half-width is 1.9632432: (1.0367568, 4.9632432).
    low, high = confidence_interval([1, 2, 3, 4, 5])
    assert low == pytest.approx(1.0367568, abs=1e-6)
    assert high == pytest.approx(4.9632432, abs=1e-6)


def test_confidence_interval_of_one_value_is_nan():
    low, high = confidence_interval([3.2])
    assert math.isnan(low) and math.isnan(high)


def test_paired_t_test_worked_by_hand():
    # Differences a - b = [3, 1, 2]: mean 2, s = 1, s / sqrt(3) = 0.5773503, t = 2 sqrt(3) = 3.4641016, df 2.
    # p (df 2 closed form) = 1 - t / sqrt(2 + t^2) = 1 - 3.4641016 / sqrt(14) = 0.0741799;
    # CI: 2 -/+ t_{0.975, 2} * 0.5773503 = 2 -/+ 4.3026527 * 0.5773503 = 2 -/+ 2.4841377.
    diff, low, high, p = paired_t_test([13.0, 11.0, 12.0], [10.0, 10.0, 10.0])
    assert diff == pytest.approx(2.0)
    assert low == pytest.approx(2 - 2.4841377, abs=1e-6)
    assert high == pytest.approx(2 + 2.4841377, abs=1e-6)
    assert p == pytest.approx(0.0741799, abs=1e-6)


def test_paired_t_test_pairs_values_rather_than_pooling_them():
    # A large shift between pairs (seeds) but a steady difference within them: significant when paired.
    a = [1.0, 5.0, 9.0, 13.0]
    b = [x - 0.1 + d for x, d in zip(a, [0.01, -0.01, 0.0, 0.005], strict=True)]
    _, low, _, p = paired_t_test(a, b)
    assert low > 0 and p < 0.001


def test_paired_t_test_edge_cases():
    diff, low, high, p = paired_t_test([1.5], [1.0])  # one pair: no spread to estimate
    assert diff == 0.5 and math.isnan(low) and math.isnan(high) and math.isnan(p)
    assert paired_t_test([2.0, 3.0], [1.0, 2.0]) == (1.0, 1.0, 1.0, 0.0)  # identical differences
    with pytest.raises(ValueError):
        paired_t_test([1.0, 2.0], [1.0])


def test_bootstrap_interval_of_a_mean_is_seeded_and_shrinks_with_more_values():
    rng = random.Random(1)
    few = [rng.gauss(0.7, 0.1) for _ in range(10)]
    many = [rng.gauss(0.7, 0.1) for _ in range(1000)]
    low, high = stats.bootstrap_mean_interval(few)
    assert low < stats.mean(few) < high and (low, high) == stats.bootstrap_mean_interval(few)
    # about mean -/+ 1.96 s / sqrt(n) for a near-normal mean
    half = 1.96 * stats.std(many) / math.sqrt(len(many))
    low, high = stats.bootstrap_mean_interval(many, resamples=2000)
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert stats.bootstrap_mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(x) for x in stats.bootstrap_mean_interval([0.5]))
