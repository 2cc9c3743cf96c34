"""Bootstrap confidence intervals that resample *volumes*, never slices.

Slices of one volume are correlated, so resampling slices would understate the spread. Every row of
a feature matrix carries the index of the volume it came from (``groups``); a bootstrap replicate
draws volumes with replacement (independently on the generated and the reference side) and takes
all of their rows. The interval is the percentile interval of the replicate values at level
``1 − alpha`` (default 95 %). Draws come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_REPLICATES = 200
DEFAULT_ALPHA = 0.05


def _rows_by_group(groups) -> list[np.ndarray]:
    g = np.asarray(groups)
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return np.split(order, np.cumsum(counts)[:-1])


def resample_rows(rows_by_group: list[np.ndarray], rng) -> np.ndarray:
    pick = rng.integers(0, len(rows_by_group), len(rows_by_group))
    return np.concatenate([rows_by_group[i] for i in pick])


def interval(stat: Callable[[np.ndarray, np.ndarray], float], gen, ref, gen_groups, ref_groups=None,
             replicates: int = DEFAULT_REPLICATES, alpha: float = DEFAULT_ALPHA, seed: int = 0) -> list[float]:
    """``[low, high]`` of ``stat(gen_rows, ref_rows)`` over volume-resampled replicates.

    ``ref_groups`` None keeps the reference fixed (resample only the generated side).
    """
    rng = np.random.default_rng(seed)
    gb = _rows_by_group(gen_groups)
    rb = _rows_by_group(ref_groups) if ref_groups is not None else None
    gen, ref = np.asarray(gen), np.asarray(ref)
    vals = []
    for _ in range(replicates):
        gi = resample_rows(gb, rng)
        r = ref[resample_rows(rb, rng)] if rb is not None else ref
        vals.append(stat(gen[gi], r))
    lo, hi = np.quantile(np.asarray(vals, dtype=np.float64), [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]
