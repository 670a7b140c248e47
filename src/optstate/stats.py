"""Statistics for comparing runs across seeds: Student's t, confidence intervals, paired differences; stdlib only."""
from __future__ import annotations

import math

_CF_MAX_ITER = 100_000  # Lentz needs O(sqrt(max(a, b))) terms; this covers df far beyond any seed count
_CF_EPS = 1e-16
_TINY = 1e-300  # keeps Lentz's denominators away from zero


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz, as Numerical Recipes' betacf)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _TINY else _TINY
            step = d * c
            h *= step
        if abs(step - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, log_x: float, log_y: float) -> float:
    """Regularized incomplete beta I_x(a, b), given log(x) and log(1 - x) so neither loses precision near 0 or 1."""
    x, y = math.exp(log_x), math.exp(log_y)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * log_x + b * log_y)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _check_df(df: float) -> None:
    if not 1 <= df < math.inf:  # also rejects NaN
        raise ValueError(f"degrees of freedom must be a finite number >= 1, got {df!r}")


def _log_beta_args(t: float, df: float) -> tuple[float, float]:
    """log(x) and log(1 - x) for x = df / (df + t^2), t > 0, in logs to survive t^2 / df under- or overflowing."""
    r = t / math.sqrt(df)
    log_r2 = 2.0 * math.log(r)
    log_1p_r2 = math.log1p(r * r) if r < 1e150 else log_r2
    return -log_1p_r2, log_r2 - log_1p_r2


def _upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, computed directly (not as 1 - cdf) so far tails keep their relative accuracy."""
    if math.isinf(t):
        return 0.0
    if t / math.sqrt(df) == 0.0:
        return 0.5
    log_x, log_y = _log_beta_args(t, df)
    return 0.5 * _betainc(df / 2.0, 0.5, log_x, log_y)


def _central(t: float, df: float) -> float:
    """P(0 < T < t) for t >= 0, computed directly (not as 0.5 - tail) so it stays accurate for tiny t."""
    if math.isinf(t):
        return 0.5
    if t / math.sqrt(df) == 0.0:
        return 0.0
    log_x, log_y = _log_beta_args(t, df)
    return 0.5 * _betainc(0.5, df / 2.0, log_y, log_x)


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with df degrees of freedom."""
    _check_df(df)
    if math.isnan(x):
        raise ValueError("x must not be NaN")
    tail = _upper_tail(abs(x), df)
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """Inverse of t_cdf: the x with P(T <= x) = p, for 0 < p < 1."""
    _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be strictly between 0 and 1, got {p!r}")
    if p == 0.5:
        return 0.0
    # Solve in whichever of P(T > t) and P(0 < T < t) is far from 1/2 (both targets are exact in floating point),
    # so that neither far tails nor the centre lose relative accuracy; both are monotone in t.
    if 0.25 < p < 0.75:
        target, below = abs(p - 0.5), lambda t: _central(t, df) < target
    else:
        target, below = min(p, 1.0 - p), lambda t: _upper_tail(t, df) > target
    lo, hi = 0.0, 1.0
    while below(hi):  # grow the bracket until it holds the answer
        lo, hi = hi, hi * 2.0
    # Bisection: robust, and ~60 steps cost nothing at these sizes.
    while hi - lo > 1e-15 * hi:
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # out of representable points between lo and hi
            break
        if below(mid):
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return t if p > 0.5 else -t


def summary(xs: list[float], level: float = 0.95) -> dict:
    """n, mean, sample std (ddof=1) and the t confidence interval for the mean; spread fields are None when n == 1."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("summary needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"summary needs finite values, got {xs}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    out = {"n": n, "mean": mean, "std": None, "ci_low": None, "ci_high": None, "level": level}
    if n > 1:
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=mean - half, ci_high=mean + half)
    return out


def paired(a: list[float], b: list[float], level: float = 0.95) -> dict:
    """summary() of the seed-by-seed differences a_i - b_i, plus the differences themselves under "diffs"."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs one value per seed on both sides, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    return {**summary(diffs, level), "diffs": diffs}


def _one_decimal(v: float) -> float:
    """v rounded for printing with one decimal, with negative zero made positive so it never prints as "-0.0"."""
    v = round(v, 1)
    return v if v != 0 else 0.0


def verdict(d: dict, what: str, scale: float = 100.0, unit: str = "points") -> str:
    """One sentence on a paired() result where positive means `what` is better than its reference."""
    n = d["n"]
    mean = _one_decimal(d["mean"] * scale)
    if n == 1 or d["ci_low"] is None:
        return f"{what}: {mean:+.1f} {unit} with one seed; no error bars (run more seeds)"
    low, high = d["ci_low"] * scale, d["ci_high"] * scale
    pct = f"{d.get('level', 0.95) * 100:.10g}%"
    if low <= 0.0 <= high:
        bound = _one_decimal(max(abs(low), abs(high)))
        return f"{what}: no detectable difference: within ±{bound:.1f} {unit} at {pct} confidence ({n} seeds)"
    if high < 0.0:
        return (f"{what} costs {_one_decimal(-mean):.1f} {unit} "
                f"({pct} CI {_one_decimal(-high):.1f} to {_one_decimal(-low):.1f}, {n} seeds)")
    return f"{what} gains {mean:.1f} {unit} ({pct} CI {_one_decimal(low):.1f} to {_one_decimal(high):.1f}, {n} seeds)"
