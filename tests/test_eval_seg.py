"""Segmentation metrics against MONAI (2D and 3D), the reference's per-lesion Dice, soft inputs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_cli.errors import InputError
from medgen_cli.metrics import bins, seg


def _blobs(shape, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.random(shape), 2) > 0.52


@pytest.mark.parametrize("shape,spacing", [((48, 40), (0.9, 1.3)), ((12, 24, 20), (2.0, 0.9375, 0.9375))])
def test_dice_and_hd95_equal_monai(shape, spacing):
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    for s in range(3):
        p, g = _blobs(shape, s), _blobs(shape, s + 10)
        tp, tg = (torch.from_numpy(x)[None, None].float() for x in (p, g))
        dm = DiceMetric(include_background=True, reduction="none")
        assert seg.voxel_scores(p, g)["dice"] == pytest.approx(dm(tp, tg).item(), rel=1e-6)
        ref_mm = compute_hausdorff_distance(tp, tg, include_background=True, percentile=95, spacing=spacing).item()
        assert seg.hd95(p, g, spacing) == pytest.approx(ref_mm, rel=1e-5)
        ref_vox = compute_hausdorff_distance(tp, tg, include_background=True, percentile=95).item()
        assert seg.hd95(p, g) == pytest.approx(ref_vox, rel=1e-5)


def test_lesion_dice_ignores_false_positives_and_classes():
    g = np.zeros((4, 64, 64), bool)
    g[1:3, 5:8, 5:8] = True  # ~2.8 mm lesion at 1 mm: tiny
    g[1:3, 30:52, 30:52] = True  # ~29.7 mm: medium
    p = g.copy()
    p[:, 5:8, 5:8] = False  # tiny lesion missed
    p[0, 60:63, 0:40] = True  # a false-positive blob far away
    les = seg.lesion_dice(p, g, (1.0, 1.0, 1.0))
    assert les[0] == (pytest.approx(1 / (18 + 1)), "tiny")
    assert les[1] == (pytest.approx(1.0), "medium")  # FP elsewhere does not count
    v = seg.voxel_scores(p, g)
    assert v["precision"] < 1 and v["recall"] < 1  # voxel scores do count them


def test_soft_maps_cannot_be_scored_unthresholded():
    soft = np.full((8, 8), 0.7, np.float32)
    with pytest.raises(InputError, match="not binary"):
        seg.scores(soft, soft > 0.5, (1.0, 1.0))
    b, was_soft = seg.binarise(soft)
    assert was_soft and b.all()


def test_bin_adherence():
    a = bins.adherence([1, 0, 2, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1, 0])
    assert a == {"bins_exact": 0.0, "bins_presence": 1.0, "bins_count": 1.0,
                 "bins_per_bin_acc": pytest.approx(5 / 7), "bins_mae": pytest.approx(2 / 7)}
    assert bins.adherence([0] * 7, [0, 1, 0, 0, 0, 0, 0])["bins_presence"] == 0.0
