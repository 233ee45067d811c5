"""Averages over images that exclude (and count) the maps without a score (NaN), and count apart the maps a
metric is undefined for (NaN too: a correlation with a constant map)."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats


def summarise(values, confidence: float = 0.95, method: str = "auto", n_boot: int = 10_000,
              seed: int = 0, *, metric: str | None = None, undefined=None) -> dict:
    """Mean and confidence interval of a metric over maps, NaN values excluded and counted.

    ``values``: any tensor/array/list (flattened). Returns ``dict(mean, ci_low,
    ci_high, n, n_excluded, n_undefined)``: ``n`` values entered the mean,
    ``n_excluded`` were NaN because the map has no score (an image with an
    empty ground-truth mask or gaze map; METHODS.md: count them, never average
    in a 0 or a NaN), ``n_undefined`` were NaN because the metric is undefined
    for the map (a correlation with a constant, collapsed map: a failing
    explainer, which must show, not pass as "no lesion"). Which NaN is which:
    ``metric``, a registered metric's name: one that compares with no ground
    truth, gaze or fixations (faithfulness estimate, the randomisation tests)
    has no "no score" case, so all its NaN are undefined (a metric with ground
    truth or gaze: all its NaN are excluded, also those of constant maps, which
    its warning counts); ``undefined``, a
    boolean mask of the values' shape (or an int count), marks the undefined
    NaN explicitly. Without either, every NaN counts as excluded. Neither
    enters the mean. ``method="t"``: Student-t
    interval ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` (s with ddof = 1);
    ``"wilson"``: Wilson score interval of a proportion, for 0/1 values
    (pointing game): it stays inside [0, 1] and is not degenerate at 0 or n
    hits, where the t-interval is; ``"auto"`` (default): Wilson when every
    value is 0 or 1, else t; ``"bootstrap"``: percentile bootstrap of the
    mean with ``n_boot`` resamples (seeded). The interval is NaN for n < 2;
    all fields but the counts are NaN for n = 0.
    """
    v = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=np.float64)
    v = v.reshape(-1)
    keep = ~np.isnan(v)
    x = v[keep]
    n, excl = int(x.size), int((~keep).sum())
    undef = _undefined_count(v, keep, metric, undefined)
    excl -= undef
    nan = float("nan")
    if n == 0:
        return dict(mean=nan, ci_low=nan, ci_high=nan, n=0, n_excluded=excl, n_undefined=undef)
    mean = float(x.mean())
    if n < 2:
        return dict(mean=mean, ci_low=nan, ci_high=nan, n=n, n_excluded=excl, n_undefined=undef)
    if method == "auto":
        method = "wilson" if np.isin(x, (0.0, 1.0)).all() else "t"
    if method == "wilson":
        if not np.isin(x, (0.0, 1.0)).all():
            raise ValueError("the Wilson interval needs values that are all 0 or 1")
        ci = stats.binomtest(int(x.sum()), n).proportion_ci(confidence_level=confidence, method="wilson")
        lo, hi = float(ci.low), float(ci.high)
    elif method == "t":
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
        lo, hi = mean - half, mean + half
    elif method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(n_boot, n))].mean(1)
        lo, hi = (float(q) for q in np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2]))
    else:
        raise ValueError("method must be 'auto', 't', 'wilson' or 'bootstrap'")
    return dict(mean=mean, ci_low=lo, ci_high=hi, n=n, n_excluded=excl, n_undefined=undef)


def _undefined_count(v: np.ndarray, keep: np.ndarray, metric: str | None, undefined) -> int:
    """How many of the NaN values of ``v`` are undefined scores rather than maps without a score."""
    n_nan = int((~keep).sum())
    if undefined is not None:
        if metric is not None:
            raise ValueError("give metric or undefined, not both")
        if isinstance(undefined, (int, np.integer)) and not isinstance(undefined, bool):
            if not 0 <= int(undefined) <= n_nan:
                raise ValueError(f"undefined must count some of the {n_nan} NaN values, got {undefined}")
            return int(undefined)
        u = undefined.detach().cpu().numpy() if torch.is_tensor(undefined) else np.asarray(undefined)
        if u.dtype != np.bool_ or u.size != v.size:
            raise ValueError(f"undefined must be a boolean mask with one value per value ({v.size}), got "
                             f"{u.dtype} of shape {u.shape}")
        u = u.reshape(-1)
        if (u & keep).any():
            raise ValueError(f"undefined marks {int((u & keep).sum())} values that are not NaN")
        return int(u.sum())
    if metric is None:
        return 0
    from nemt.metrics._common import get_metric
    inputs = get_metric(metric).inputs
    return 0 if {"gt", "gaze", "fixations"} & set(inputs) else n_nan
