"""Percentile bootstrap confidence intervals for any metric of paired arrays.

Hand-rolled rather than `scipy.stats.bootstrap` because metrics such as ROC AUC are undefined
on resamples holding one class only: those resamples are skipped here (scipy would fail), and
`strata` resamples within groups (e.g. the true class) so every resample keeps the class counts.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np


def bootstrap_ci(metric_fn: Callable[..., float | np.ndarray], *arrays: np.ndarray, n: int = 1000,
                 seed: int = 0, alpha: float = 0.05,
                 strata: np.ndarray | None = None) -> tuple[float | np.ndarray, float | np.ndarray]:
    """(low, high) of the central 1-alpha interval of metric_fn(*resampled arrays).

    Rows of all arrays are resampled together with replacement, n times, from a seeded
    generator, so the interval is reproducible. metric_fn may return a scalar or a vector (then
    low and high are vectors); resamples where it raises ValueError or returns NaN are skipped.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    size = len(arrays[0])
    if any(len(a) != size for a in arrays):
        raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
    if size == 0:
        raise ValueError("no rows to resample")
    rng = np.random.default_rng(seed)
    groups = [np.arange(size)] if strata is None else [
        np.flatnonzero(np.asarray(strata) == s) for s in np.unique(strata)]
    values = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        try:
            values.append(np.asarray(metric_fn(*(a[idx] for a in arrays)), float))
        except ValueError:
            values.append(np.float64(np.nan))
    values = np.stack(np.broadcast_arrays(*values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, said below
        low, high = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    if np.ndim(low) == 0:
        return float(low), float(high)
    return low, high
