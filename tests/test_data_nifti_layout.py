"""NIfTI I/O (data/nifti.py) and the dataset layout and checks (data/layout.py)."""

import logging

import numpy as np
import pytest

from medgen_cli.data import layout, nifti
from medgen_cli.errors import InputError, UsageError


class _Capture(logging.Handler):
    """Collects messages of the 'medgen' logger (independent of how the CLI wires logging)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def notices():
    handler, logger = _Capture(), logging.getLogger("medgen")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def _patient(folder, shape=(8, 8, 4), seed=0, mods=layout.MODALITIES):
    rng = np.random.default_rng(seed)
    for m in mods:
        arr = (rng.random(shape) > 0.8).astype(np.uint8) if m == "seg" else rng.random(shape).astype(np.float32)
        nifti.write_nifti(folder / f"{m}.nii.gz", arr, spacing=(0.5, 0.5, 2.0))


def _dataset(root, counts=(2, 1, 1)):
    for split, n in zip(layout.SPLITS, counts):
        for k in range(n):
            _patient(root / split / f"P{split}{k}", seed=k)
    return root


# --- nifti -----------------------------------------------------------------------------------


def test_write_read_round_trip_keeps_spacing_affine_and_dtype(tmp_path):
    img = np.random.default_rng(0).random((6, 5, 4)).astype(np.float64)  # (H, W, D)
    path = nifti.write_nifti(tmp_path / "a" / "img.nii.gz", img, spacing=(0.9375, 0.9375, 1.0))
    arr, spacing, affine = nifti.read_image(path)
    assert arr.dtype == np.float32 and arr.shape == (6, 5, 4)
    np.testing.assert_allclose(arr, img.astype(np.float32))
    assert spacing == pytest.approx((0.9375, 0.9375, 1.0))
    np.testing.assert_allclose(affine, nifti.affine_from_spacing((0.9375, 0.9375, 1.0)))
    mask = nifti.write_nifti(tmp_path / "m.nii.gz", img > 0.5, affine=np.diag([2.0, 3.0, 4.0, 1.0]))
    import nibabel as nib
    assert nib.load(str(mask)).get_data_dtype() == np.uint8
    assert nifti.spacing_of(nib.load(str(mask))) == (2.0, 3.0, 4.0)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["img.nii.gz", "m.nii.gz"]


def test_dhw_transposes_are_inverse():
    a = np.arange(24).reshape(2, 3, 4)  # (H, W, D)
    assert nifti.to_dhw(a).shape == (4, 2, 3)
    np.testing.assert_array_equal(nifti.from_dhw(nifti.to_dhw(a)), a)


def test_read_image_rejects_nan_and_garbage(tmp_path):
    vol = np.ones((4, 4, 3), np.float32)
    vol[1, 1, 1] = np.nan
    vol[2, 2, 2] = np.inf
    bad = nifti.write_nifti(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(InputError) as exc:
        nifti.read_image(bad)
    assert "2 NaN/Inf" in exc.value.what and exc.value.where.endswith("nan.nii.gz") and exc.value.hint
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        nifti.read_image(tmp_path / "junk.nii.gz")
    with pytest.raises(InputError, match="not found"):
        nifti.read_image(tmp_path / "missing.nii.gz")


def test_read_mask_binarises_two_valued_mask_with_notice(tmp_path, notices):
    m = np.zeros((4, 4, 2), np.uint8)
    m[1:3, 1:3, 0] = 255
    path = nifti.write_nifti(tmp_path / "seg.nii.gz", m, mask=False)  # stored as float {0, 255}
    out = nifti.read_mask(path)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1} and out.sum() == 4
    assert len(notices) == 1 and "seg.nii.gz" in notices[0] and "binarised" in notices[0]


@pytest.mark.parametrize("values, message", [((0, 1, 2), "3 distinct values"), ((-1, 0), "negative"),
                                             ((0, np.nan), "NaN")])
def test_read_mask_rejects_bad_values(tmp_path, values, message):
    m = np.zeros((3, 3, 3), np.float32)
    m.flat[: len(values)] = values
    with pytest.raises(InputError, match=message):
        nifti.read_mask(nifti.write_nifti(tmp_path / "seg.nii.gz", m, mask=False))


# --- layout ----------------------------------------------------------------------------------


def test_split_dir_resolves_test_and_rejects_unknown(tmp_path):
    (tmp_path / "test").mkdir()
    assert layout.split_dir(tmp_path, "test").name == "test"
    (tmp_path / "test_new").mkdir()
    assert layout.split_dir(tmp_path, "test").name == "test_new"
    assert layout.split_dir(tmp_path, "val") == tmp_path / "val"
    with pytest.raises(UsageError) as exc:
        layout.split_dir(tmp_path, "trian")
    assert "did you mean 'train'" in exc.value.hint


def test_patients_sorted_and_all_is_a_union_without_duplicates(tmp_path):
    for split, names in {"train": ["b", "a"], "val": ["c"], "test_new": ["d"], "test": ["d", "e"]}.items():
        for n in names:
            (tmp_path / split / n).mkdir(parents=True)
    assert [p.name for p in layout.patients(tmp_path, "train")] == ["a", "b"]
    assert [p.name for p in layout.patients(tmp_path, "test")] == ["d"]
    assert [p.name for p in layout.patients(tmp_path, "all")] == ["a", "b", "c", "d", "e"]


def test_patients_missing_or_empty_split_is_input_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(InputError) as exc:
        layout.patients(tmp_path, "train")
    assert "no patient folders" in exc.value.what and exc.value.where.endswith("train") and exc.value.hint
    with pytest.raises(InputError, match="'val' not found"):
        layout.patients(tmp_path, "val")
    with pytest.raises(InputError, match="dataset folder not found"):
        layout.patients(tmp_path / "nowhere", "train")


def test_check_dataset_clean_dataset_has_no_problems(tmp_path):
    assert layout.check_dataset(_dataset(tmp_path)) == []


def test_check_dataset_names_every_problem(tmp_path):
    root = _dataset(tmp_path, counts=(3, 1, 0))
    (root / "test_new").mkdir()  # empty split
    train = layout.patients(root, "train")
    (train[0] / "flair.nii.gz").unlink()  # missing modality
    nifti.write_nifti(train[1] / "t1_pre.nii.gz", np.ones((8, 8, 5), np.float32))  # other shape
    three = np.zeros((8, 8, 4), np.float32)
    three[0, 0, 0], three[1, 1, 1] = 1, 2
    nifti.write_nifti(train[2] / "seg.nii.gz", three, mask=False)  # 3-valued mask
    nan = np.ones((8, 8, 4), np.float32)
    nan[3, 3, 3] = np.nan
    nifti.write_nifti(train[2] / "bravo.nii.gz", nan)  # NaN voxels
    val = layout.patients(root, "val")[0]
    nifti.write_nifti(val / "seg.nii.gz", np.where(np.eye(8)[:, :, None] > 0, 255.0, 0.0).repeat(4, 2), mask=False)
    (val / "t1_gd.nii.gz").write_bytes(b"garbage")
    problems = layout.check_dataset(root)
    got = {(p.severity, p.what.split(" (")[0].split(":")[0], p.path.split("/")[-1]) for p in problems}
    assert got == {
        ("error", "missing modality file 'flair.nii.gz'", "flair.nii.gz"),
        ("error", "modalities have different shapes", train[1].name),
        ("error", "mask has 3 distinct values", "seg.nii.gz"),
        ("error", "volume has 1 NaN/Inf voxels", "bravo.nii.gz"),
        ("notice", "mask values are {0, 255}; will be binarised", "seg.nii.gz"),
        ("error", "unreadable or not a NIfTI file", "t1_gd.nii.gz"),
        ("error", "split folder 'test_new' is empty", "test_new"),
    }
    assert all(p.hint for p in problems)


def test_check_dataset_missing_split_and_modality_subset(tmp_path):
    root = _dataset(tmp_path, counts=(1, 0, 0))
    problems = layout.check_dataset(root, modalities=["bravo", "seg"], splits=["train", "val"])
    assert [(p.what, p.path.split("/")[-1]) for p in problems] == [("split folder 'val' missing", "val")]
    with pytest.raises(UsageError, match="unknown modality"):
        layout.check_dataset(root, modalities=["t2"])


def test_two_d_slices_round_trip(tmp_path):
    sl = np.random.default_rng(0).random((6, 5)).astype(np.float32)  # (H, W): a 2D model's output
    arr, spacing, _ = nifti.read_image(nifti.write_nifti(tmp_path / "s.nii.gz", sl, spacing=(0.5, 0.5, 1.0)))
    assert arr.shape == (6, 5) and spacing == (0.5, 0.5, 1.0)
    np.testing.assert_array_equal(arr, sl)
    assert nifti.read_mask(nifti.write_nifti(tmp_path / "m.nii.gz", sl > 0.5)).shape == (6, 5)
    with pytest.raises(InputError, match="expected a 3-D volume"):
        nifti.require_volume(arr, tmp_path / "s.nii.gz")
