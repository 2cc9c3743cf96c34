"""2D slice augmentation: the transform, static (once, keyed by seed) and dynamic (keyed by epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_cli.data import augment
from medgen_cli.data.datasets import SliceDataset


def test_apply_flips_and_shifts_with_zero_fill():
    a = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5) + 1
    out = augment.apply(a, augment.SliceTransform(True, 1, -2))
    ref = a[..., ::-1]
    assert np.array_equal(out[:, 1:, :3], ref[:, :3, 2:])  # moved down 1 and left 2
    assert (out[:, 0] == 0).all() and (out[:, :, 3:] == 0).all()
    assert augment.apply(a, augment.IDENTITY) is a


def test_draws_stay_in_range_and_are_keyed():
    trs = [augment.draw((5, 1, i), 128, 128) for i in range(400)]
    assert max(abs(t.dx) for t in trs) <= 25 and max(abs(t.dy) for t in trs) <= 12
    assert max(abs(t.dx) for t in trs) > 12  # x moves further than y
    assert 0.35 < np.mean([t.flip for t in trs]) < 0.65
    assert trs == [augment.draw((5, 1, i), 128, 128) for i in range(400)]


@pytest.mark.parametrize("mode", ["bravo", "dual"])
def test_static_augmentation_is_applied_once_and_keyed_by_seed(phantom_root, mode):
    plain = SliceDataset(phantom_root, "train", mode, image_size=16)
    a = SliceDataset(phantom_root, "train", mode, image_size=16, augment="static", seed=1)
    b = SliceDataset(phantom_root, "train", mode, image_size=16, augment="static", seed=1)
    c = SliceDataset(phantom_root, "train", mode, image_size=16, augment="static", seed=2)
    assert a.index == plain.index  # the same slices, each replaced by one augmented copy
    n = len(a)
    first = [a[i] for i in range(n)]
    a.set_epoch(7)  # static: the epoch changes nothing
    for i in range(n):
        assert torch.equal(a[i]["image"], first[i]["image"]) and torch.equal(a[i]["cond"], first[i]["cond"])
        assert torch.equal(b[i]["image"], first[i]["image"])
        tr = a.augmenter.transform(i)  # image and mask moved together
        both = np.concatenate([plain[i]["image"].numpy(), plain[i]["cond"].numpy()])
        assert np.array_equal(augment.apply(both, tr), torch.cat([first[i]["image"], first[i]["cond"]]).numpy())
    assert sum(not torch.equal(first[i]["image"], plain[i]["image"]) for i in range(n)) > n // 2
    assert any(not torch.equal(c[i]["image"], first[i]["image"]) for i in range(n))


def test_dynamic_augmentation_changes_with_the_epoch(phantom_root):
    ds = SliceDataset(phantom_root, "train", "bravo", image_size=16, augment="dynamic", seed=1)
    e0 = [ds[i]["image"] for i in range(len(ds))]
    assert all(torch.equal(ds[i]["image"], e0[i]) for i in range(len(ds)))
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["image"], e0[i]) for i in range(len(ds)))
    ds.set_epoch(0)
    assert all(torch.equal(ds[i]["image"], e0[i]) for i in range(len(ds)))


def test_augment_is_2d_only(tiny_preset, cli, phantom_root, tmp_path):
    r = cli("train", "--preset", tiny_preset(3), "--data", phantom_root, "--run-dir", tmp_path / "r",
            "--set", 'data.augment="static"', "--dry-run")
    assert r.code == 3 and "augment" in r.err
