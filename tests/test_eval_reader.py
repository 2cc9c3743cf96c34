"""The fast reference/generated reader (threads, device-side normalisation) equals the plain nibabel path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_cli.data.nifti import write_nifti
from medgen_cli.errors import InputError
from medgen_cli.jobs import evaluate as job


class Pixels:  # an "extractor" whose features are the slice's pixels, resized to 6x6
    device = torch.device("cpu")

    def __call__(self, x):
        return torch.nn.functional.interpolate(x.float(), size=(6, 6), mode="bilinear").flatten(1)


def _expected(paths, role, planes, depth, binary=False):
    rows, groups = [], []
    for i, p in enumerate(paths):
        for s in job.load_slices(str(p), role, planes, depth, binary):
            rows.append(Pixels()(torch.from_numpy(s)[:, None]).numpy())
            groups += [i] * len(s)
    return np.concatenate(rows), np.array(groups)


@pytest.mark.parametrize("workers", [0, 3])
def test_fast_reader_equals_nibabel_path(tmp_path, workers):
    import nibabel as nib

    rng = np.random.default_rng(0)
    files = []
    a = (rng.random((12, 10, 9)) * 3 - 1).astype(np.float32)
    files.append(write_nifti(tmp_path / "a" / "bravo.nii.gz", a, spacing=(1, 1, 2)))
    b = rng.integers(-50, 900, (12, 10, 7)).astype(np.int16)  # stored type + scaling
    img = nib.Nifti1Image(b, np.eye(4))
    img.header.set_slope_inter(0.01, -0.5)
    nib.save(img, tmp_path / "b.nii.gz")
    files.append(tmp_path / "b.nii.gz")
    c = rng.random((12, 10, 5)).astype(np.float64)
    nib.save(nib.Nifti1Image(c, np.eye(4)), tmp_path / "c.nii")  # not gzipped
    files.append(tmp_path / "c.nii")
    nib.save(nib.Nifti1Image(np.full((12, 10, 4), 3.0, np.float32), np.eye(4)), tmp_path / "d.nii.gz")  # constant
    files.append(tmp_path / "d.nii.gz")
    for p in files:  # every one of these takes the fast path (nibabel only parses the header)
        assert job._read_fast(p, 150, False) is not None
    for role, planes, depth, binary in (("ref", "axial", 8, False), ("gen", "tri", 150, False),
                                        ("gen", "axial", None, True), ("ref", "tri", 6, False)):
        f, g = job.extract(files, Pixels(), role, planes, depth, binary, workers=workers, batch=4)
        ef, eg = _expected(files, role, planes, depth, binary)
        assert f.shape == ef.shape and (g == eg).all()
        np.testing.assert_allclose(f, ef, rtol=1e-6, atol=1e-6)


def test_fast_reader_2d_and_bad_voxels(tmp_path):
    img2d = np.random.default_rng(1).random((16, 12)).astype(np.float32)
    p2 = write_nifti(tmp_path / "s.nii.gz", img2d, spacing=(1, 1, 1))
    f, g = job.extract([p2], Pixels(), "gen", "tri", workers=1)
    np.testing.assert_allclose(f, _expected([p2], "gen", "tri", 150)[0], atol=1e-7)
    bad = np.zeros((8, 8, 3), np.float32)
    bad[1, 2, 0] = np.nan
    import nibabel as nib

    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(InputError, match="NaN"):
        job.extract([p2, tmp_path / "bad.nii.gz"], Pixels(), "ref", workers=2)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError):
        job.extract([tmp_path / "junk.nii.gz"], Pixels(), "ref", workers=1)


def test_reference_cache_key_is_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(2).random((8, 8, 4)).astype(np.float32)
    p = write_nifti(tmp_path / "r" / "bravo.nii.gz", x, spacing=(1, 1, 1))
    ext = Pixels()
    ext.name, ext.sha256, ext.preprocessing = "pixels", "0" * 64, "none"
    f, _, hit = job.reference_features([p], ext, "axial", 150)
    assert not hit
    moved = tmp_path / "elsewhere.nii.gz"
    moved.write_bytes(p.read_bytes())  # same content, other path and mtime
    f2, _, hit = job.reference_features([moved], ext, "axial", 150)
    assert hit and np.array_equal(f, f2)
    write_nifti(moved, x * 0.5 + 0.1, spacing=(1, 1, 1))  # new content under the same path
    _, _, hit = job.reference_features([moved], ext, "axial", 150)
    assert not hit
