"""Small-sample statistics for comparing training runs over a few seeds.

Mean, sample standard deviation, Student's t distribution (CDF and quantile), a confidence interval for a
mean and the paired t-test, written out here so that the experiment runner needs no SciPy. The t CDF comes
from the regularised incomplete beta function, evaluated by its continued fraction:

    P(|T| > t) = I_x(df / 2, 1 / 2)   with   x = df / (df + t^2)

With one value there is no spread to estimate: intervals and p-values are then nan (shown as "n/a").
"""

import math
import random
from collections.abc import Sequence

_TINY = 1e-300  # keeps the continued fraction's denominators away from zero
_EPS = 1e-15  # relative accuracy at which the continued fraction stops


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (divides by n - 1); nan for fewer than two values."""
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    # x^a (1-x)^b / B(a, b), in logs so that large a, b do not overflow
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x below the mean (a+1)/(a+b+2); above it, use the
    # symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1) / (a + b + 2):
        return front / (a * _beta_continued_fraction(a, b, x))
    return 1.0 - front / (b * _beta_continued_fraction(b, a, 1.0 - x))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """K = 1 + d1 / (1 + d2 / (1 + ...)), so that I_x(a, b) = x^a (1-x)^b / (B(a, b) a K), by Lentz's method.

    The terms: d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)).
    """
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, 10_000):
        m = j // 2
        if j % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + term / c
        c = c if abs(c) > _TINY else _TINY
        f *= c * d
        if abs(c * d - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    upper_tail = t_two_sided_p(t, df) / 2  # P(T > |t|), by symmetry half the two-sided tail
    return 1.0 - upper_tail if t > 0 else upper_tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, found by bisection on the CDF (monotone, so it cannot miss)."""
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean: mean -/+ t_{(1+level)/2, n-1} * s / sqrt(n); (nan, nan) for n < 2."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = t_quantile(0.5 + level / 2, n - 1) * std(values) / math.sqrt(n)
    m = mean(values)
    return m - half, m + half


def paired_t_test(a: Sequence[float], b: Sequence[float],
                  level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean of the differences a_i - b_i, its confidence interval, and the two-sided p-value of the
    t-test of "the mean difference is zero". Pairing (here: by seed) removes what the pair shares."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired test needs two equally long, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    m, n = mean(diffs), len(diffs)
    if n < 2:
        return m, math.nan, math.nan, math.nan
    s = std(diffs)
    if s == 0:  # every pair differs by the same amount: no noise to test against
        return m, m, m, (1.0 if m == 0 else 0.0)
    low, high = confidence_interval(diffs, level)
    return m, low, high, t_two_sided_p(m / (s / math.sqrt(n)), n - 1)


def bootstrap_mean_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: the means of `resamples` samples drawn with replacement, cut
    at (1 - level) / 2 and (1 + level) / 2. Seeded, so a table's interval reads the same on every run."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    cut = round(resamples * (1 - level) / 2)
    return means[cut], means[resamples - 1 - cut]
