"""Size-bin adherence (SYSTEM.md §9, ``eval_bin_adherence``): does a generated mask have the tumour
size-bin vector it was asked for?

Per pair (requested vector r, generated vector g, each 7 counts from ``data.sizebins.size_bins``):

* ``bins_exact`` — the whole vector equal;
* ``bins_presence`` — (r has a tumour) == (g has a tumour);
* ``bins_count`` — total tumour counts equal;
* ``bins_per_bin_acc`` — mean over the 7 bins of (r_i == g_i);
* ``bins_mae`` — mean over the 7 bins of |r_i − g_i|.

Each is averaged over pairs. Pure numpy.
"""

from __future__ import annotations

import numpy as np

NAMES = ("bins_exact", "bins_presence", "bins_count", "bins_per_bin_acc", "bins_mae")


def adherence(requested, generated) -> dict[str, float]:
    """Per-pair scores for one requested/generated pair of bin vectors."""
    r, g = np.asarray(requested, dtype=np.int64), np.asarray(generated, dtype=np.int64)
    if r.shape != g.shape:
        raise ValueError(f"bin vectors differ in length: {r.shape} vs {g.shape}")
    return {"bins_exact": float(np.array_equal(r, g)),
            "bins_presence": float((r.sum() > 0) == (g.sum() > 0)),
            "bins_count": float(r.sum() == g.sum()),
            "bins_per_bin_acc": float(np.mean(r == g)),
            "bins_mae": float(np.mean(np.abs(r - g)))}


def summarise(pairs) -> dict[str, list[float]]:
    """name → per-pair values over ``pairs`` of (requested, generated)."""
    out: dict[str, list[float]] = {k: [] for k in NAMES}
    for r, g in pairs:
        for k, v in adherence(r, g).items():
            out[k].append(v)
    return out
