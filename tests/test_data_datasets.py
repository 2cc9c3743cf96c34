"""Patient loading, 2D slice and 3D volume datasets (data/datasets.py)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medgen_cli.data import datasets, nifti
from medgen_cli.errors import InputError, UsageError

H = W = 8
D = 5


def _write_patient(folder, bravo_dhw, seg_dhw, spacing=(0.5, 0.5, 1.0)):
    nifti.write_nifti(folder / "bravo.nii.gz", nifti.from_dhw(bravo_dhw), spacing=spacing)
    nifti.write_nifti(folder / "seg.nii.gz", nifti.from_dhw(seg_dhw).astype(np.uint8), spacing=spacing)


def _rule_volumes():
    """bravo (D, H, W) whose slices sum to 0, exactly 1, 2, 32, 64; seg with 10 / 9 tumour pixels."""
    bravo = np.zeros((D, H, W), np.float32)
    bravo[1, 0, 0] = 1.0  # sum exactly 1.0 → dropped
    bravo[2, 0, :2] = 1.0  # sum 2 → kept
    bravo[3] = 0.5  # sum 32 → kept
    bravo[4] = 1.0  # sum 64 → kept
    seg = np.zeros((D, H, W), np.float32)
    seg[2, 2, :10 - H] = 1
    seg[2, 3] = 1  # 10 pixels on slice 2 (kept in seg mode)
    seg[3, 4, :1] = 1
    seg[3, 5] = 1  # 9 pixels on slice 3 (dropped in seg mode)
    return bravo, seg


@pytest.fixture
def root(tmp_path):
    bravo, seg = _rule_volumes()
    for split, name in (("train", "B"), ("train", "A"), ("val", "V")):
        _write_patient(tmp_path / split / name, bravo, seg)
    return tmp_path


def test_slice_rules_bravo_mode(root):
    ds = datasets.SliceDataset(root, "train", "bravo", cache_dir=False)
    assert [p.name for p in ds.patient_dirs] == ["A", "B"]
    assert ds.index == [(0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    item = ds[0]
    assert item["image"].shape == (1, H, W) and item["cond"].shape == (1, H, W)
    assert item["image"].dtype == torch.float32 and item["patient"] == "A" and item["slice"] == 2
    assert item["cond"].sum() == 10 and ds.spacing_of(0) == (0.5, 0.5, 1.0)


def test_slice_rules_seg_mode_and_resize(root):
    assert datasets.SliceDataset(root, "train", "seg", cache_dir=False).index == [(0, 2), (1, 2)]
    ds = datasets.SliceDataset(root, "train", "seg", image_size=16, cache_dir=False)
    assert ds.index == [(0, 2), (0, 3), (1, 2), (1, 3)]  # pixels are counted after the resize (9 → 36)
    item = ds[2]
    assert item["image"].shape == (1, 16, 16) and item["cond"].shape == (0, 16, 16)
    assert set(item["image"].unique().tolist()) == {0.0, 1.0}
    assert ds.spacing_of(2) == (0.25, 0.25, 1.0)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["cond"].shape == (2, 0, 16, 16)


def test_empty_dataset_is_rejected_with_split_folder(tmp_path):
    bravo, seg = _rule_volumes()
    _write_patient(tmp_path / "val" / "P", bravo, np.zeros_like(seg))
    with pytest.raises(InputError) as exc:
        datasets.SliceDataset(tmp_path, "val", "seg", cache_dir=False)
    assert exc.value.where.endswith("val")
    with pytest.raises(InputError, match="'train' not found"):
        datasets.SliceDataset(tmp_path, "train", "bravo", cache_dir=False)
    with pytest.raises(UsageError, match="unknown mode") as exc:
        datasets.SliceDataset(tmp_path, "val", "segg", cache_dir=False)
    assert "did you mean 'seg'" in exc.value.hint


@pytest.mark.parametrize("pad_mode", ["replicate", "constant"])
def test_volume_dataset_shapes_and_depth_padding(root, pad_mode):
    ds = datasets.VolumeDataset(root, "train", "bravo", image_size=4, pad_depth_to=8, pad_mode=pad_mode,
                                cache_dir=False)
    item = ds[0]
    assert item["image"].shape == (1, 8, 4, 4) and item["cond"].shape == (1, 8, 4, 4) and item["slice"] == -1
    tail = item["image"][0, D:]
    want = item["image"][0, D - 1].expand_as(tail) if pad_mode == "replicate" else torch.zeros_like(tail)
    torch.testing.assert_close(tail, want)
    assert ds.spacing_of(0) == (1.0, 1.0, 1.0) and ds.depth_of(0) == D
    seg = datasets.VolumeDataset(root, "val", "seg", pad_depth_to=None, cache_dir=False)[0]
    assert seg["image"].shape == (1, D, H, W) and seg["cond"].shape == (0, D, H, W)
    with pytest.raises(InputError, match="more than pad_depth_to"):
        datasets.VolumeDataset(root, "val", "seg", pad_depth_to=3, cache_dir=False)[0]


def test_load_patient_normalisation_cache_and_shape_check(root, tmp_path):
    raw = np.linspace(0, 8000, D * H * W, dtype=np.float32).reshape(D, H, W)
    seg = np.zeros((D, H, W), np.float32)
    pdir = tmp_path / "p"
    _write_patient(pdir, raw, seg)
    mm = datasets.load_patient(pdir, ["bravo", "seg"], cache_dir=tmp_path / "c")
    assert mm["bravo"].min() == 0 and mm["bravo"].max() == 1 and mm["seg"].dtype == np.float32
    gp = datasets.load_patient(pdir, ["bravo"], normalization="global_percentile", cache_dir=tmp_path / "c")
    np.testing.assert_allclose(gp["bravo"], np.clip(raw / 5898.0, 0, 1), rtol=1e-6)
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 3
    nifti.write_nifti(pdir / "seg.nii.gz", np.zeros((H, W, D + 1), np.uint8))
    with pytest.raises(InputError, match="different shapes"):
        datasets.load_patient(pdir, ["bravo", "seg"], cache_dir=False)
    with pytest.raises(InputError, match="missing modality file 'flair.nii.gz'"):
        datasets.load_patient(pdir, ["flair"], cache_dir=False)


def test_phantom_end_to_end_2d_and_3d(tmp_path):
    from medgen_cli.data import phantom

    root = phantom.synth_dataset(tmp_path / "ds", 2, 1, 1, size=32, depth=12, seed=1)
    ds2 = datasets.SliceDataset(root, "train", "bravo", image_size=16, cache_dir=tmp_path / "c")
    assert 0 < len(ds2) <= 24 and ds2[0]["image"].max() <= 1.0
    ds3 = datasets.VolumeDataset(root, "test", "bravo", image_size=16, pad_depth_to=16, cache_dir=tmp_path / "c")
    assert ds3[0]["image"].shape == (1, 16, 16, 16) and ds3.spacing_of(0) == (15.0, 15.0, 1.0)
