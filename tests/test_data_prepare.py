"""Preparing a (tiny, fake) BrainMetShare release into the medgen layout (data/prepare.py)."""

import random

import numpy as np
import pytest
from PIL import Image

from medgen_cli.data import layout, nifti, prepare
from medgen_cli.errors import InputError
from medgen_cli.jobs import data as jobs

H, W = 20, 16  # non-square slices: padded to 20×20, then resized


def _png_case(folder, depth=8, seg=True, short_flair=False, seed=0):
    rng = np.random.default_rng(seed)
    for key in ("0", "1", "2", "3") + (("seg",) if seg else ()):
        n = depth - 1 if (short_flair and key == "3") else depth
        for z in range(1, n + 1):  # 1.png … n.png: numeric, not lexical, order matters (10 < 2)
            if key == "seg":
                a = np.zeros((H, W), np.uint8)
                a[5:12, 4:10] = 255 if z % 2 else 0
            else:
                a = np.full((H, W), z * 10, np.uint8) + rng.integers(0, 5, (H, W), dtype=np.uint8)
            (folder / key).mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(folder / key / f"{z}.png")


def _png_release(raw, n_train=2, n_test=5):
    base = raw / "stanford_release_brainmask"
    for k in range(n_train):
        _png_case(base / "mets_stanford_releaseMask_train" / f"Mets_{k:03d}", depth=11, short_flair=(k == 0))
    for k in range(n_test):
        _png_case(base / "mets_stanford_releaseMask_test" / f"Mets_{100 + k:03d}", seg=(k != 0))
    return raw


def test_png_release_layout_geometry_and_split(tmp_path):
    raw = _png_release(tmp_path / "raw")
    out = jobs.prepare(raw, tmp_path / "out", seed=42, size=10, depth=9)
    assert [p.name for p in layout.patients(out, "train")] == ["Mets_000", "Mets_001"]
    val, test_new = layout.patients(out, "val"), layout.patients(out, "test_new")
    assert len(val) == 2 and len(test_new) == 3  # ⌊5/2⌋ to val
    want_val, _ = prepare.split_test([f"Mets_{100 + k:03d}" for k in range(5)], seed=42)
    assert [p.name for p in val] == want_val
    m0 = out / "train" / "Mets_000"
    bravo, spacing, _ = nifti.read_image(m0 / "bravo.nii.gz")
    assert bravo.shape == (10, 10, 9)  # 11 slices truncated to depth 9 … and flair had only 10
    assert nifti.read_image(m0 / "flair.nii.gz")[0].shape == (10, 10, 9)
    assert nifti.read_image(out / "train" / "Mets_001" / "t1_gd.nii.gz")[0].shape == (10, 10, 9)
    assert spacing == pytest.approx((0.9375 * 2, 0.9375 * 2, 1.0))  # 20 px (after padding) → 10 px
    np.testing.assert_allclose(bravo[:, 1:9, 0].mean(), 12, atol=3)  # slice order is numeric
    np.testing.assert_allclose(bravo[:, 1:9, 8].mean(), 92, atol=3)
    seg = nifti.read_mask(m0 / "seg.nii.gz")
    assert set(np.unique(seg)) == {0, 1} and seg[:, :, 0].any() and not seg[:, :, 1].any()
    assert not bravo[:, [0, 9], :].any() and (bravo[:, 1:9, :] > 0).all()  # W padded 16 → 20 symmetrically
    unlabelled = [p for p in (*val, *test_new) if p.name == "Mets_100"][0]
    assert nifti.find_modality(unlabelled, "seg") is None and nifti.find_modality(unlabelled, "flair")
    assert not list(out.glob(".prepare-tmp-*"))


def test_nifti_release_and_spacing_from_header(tmp_path):
    raw = tmp_path / "raw"
    for split, names in (("train", ["Mets_001"]), ("test", ["Mets_201", "Mets_202"])):
        for n in names:
            for m in layout.MODALITIES:
                depth = 5 if m == "t1_pre" else 6
                a = np.zeros((12, 12, depth), np.uint8 if m == "seg" else np.float32)  # (H, W, D)
                a[4:8, 4:8, :] = 1 if m == "seg" else 100.0
                nifti.write_nifti(raw / split / n / f"{m}.nii.gz", a, spacing=(1.0, 1.0, 2.0))
    out = prepare.prepare_brainmetshare(raw, tmp_path / "out", size=24, depth=150)
    bravo, spacing, _ = nifti.read_image(out / "train" / "Mets_001" / "bravo.nii.gz")
    assert bravo.shape == (24, 24, 5) and spacing == pytest.approx((0.5, 0.5, 2.0))
    assert len(layout.patients(out, "val")) == 1 and len(layout.patients(out, "test_new")) == 1
    assert jobs.check(out) == []


def test_split_rule_and_reference_compat():
    names = [f"Mets_{k:03d}" for k in range(51)]
    val, test_new = prepare.split_test(reversed(names), seed=42)
    assert len(val) == 25 and len(test_new) == 26 and sorted(val + test_new) == names
    assert prepare.split_test(names, seed=42) == (val, test_new)
    assert prepare.split_test(names, seed=43) != (val, test_new)
    shuffled = list(names)
    random.Random(42).shuffle(shuffled)
    assert prepare.split_test(names, 42, compat_split=True) == (sorted(shuffled[:25]), sorted(shuffled[25:]))


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(InputError, match="not found"):
        prepare.prepare_brainmetshare(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "raw" / "other").mkdir(parents=True)
    with pytest.raises(InputError, match="no 'train' folder") as exc:
        prepare.prepare_brainmetshare(tmp_path / "raw", tmp_path / "out")
    assert "mets_stanford_releaseMask" in exc.value.hint
    _png_case(tmp_path / "raw" / "train" / "Mets_001", depth=3)
    for f in (tmp_path / "raw" / "train" / "Mets_001" / "seg").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="no PNG slices"):
        prepare.prepare_brainmetshare(tmp_path / "raw", tmp_path / "out")
    (tmp_path / "raw" / "train" / "Mets_001" / "seg").rmdir()
    with pytest.raises(InputError, match="lacks the 'seg' sequence"):
        prepare.prepare_brainmetshare(tmp_path / "raw", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        prepare.prepare_brainmetshare(tmp_path / "raw", tmp_path / "full")
