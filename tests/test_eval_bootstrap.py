"""Volume-resampling bootstrap: intervals cover a known truth at about the nominal rate."""

from __future__ import annotations

import numpy as np

from medgen_cli.metrics import bootstrap


def test_bootstrap_covers_truth_at_nominal_rate():
    rng = np.random.default_rng(0)
    hits, trials = 0, 150
    for t in range(trials):
        # 40 volumes × 10 correlated slices each: a volume effect plus slice noise; truth: difference 0.5
        gv = rng.normal(0.5, 1.0, 40)[:, None] + rng.normal(0, 0.3, (40, 10))
        rv = rng.normal(0.0, 1.0, 40)[:, None] + rng.normal(0, 0.3, (40, 10))
        groups = np.repeat(np.arange(40), 10)
        stat = lambda a, b: float(a.mean() - b.mean())  # noqa: E731
        lo, hi = bootstrap.interval(stat, gv.reshape(-1, 1), rv.reshape(-1, 1), groups, groups,
                                    replicates=200, seed=t)
        hits += lo <= 0.5 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_slice_resampling_would_undercover():
    """The reason for grouping: treating slices as independent gives too narrow intervals."""
    rng = np.random.default_rng(1)
    gv = rng.normal(0, 1.0, 40)[:, None] + rng.normal(0, 0.3, (40, 10))
    stat = lambda a, b: float(a.mean())  # noqa: E731
    by_vol = bootstrap.interval(stat, gv.reshape(-1, 1), gv.reshape(-1, 1), np.repeat(np.arange(40), 10), None, 200)
    by_slice = bootstrap.interval(stat, gv.reshape(-1, 1), gv.reshape(-1, 1), np.arange(400), None, 200)
    assert (by_vol[1] - by_vol[0]) > 2 * (by_slice[1] - by_slice[0])
