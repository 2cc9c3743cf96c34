"""Connected components, exact Feret diameters, size bins and RANO-BM classes (data/sizebins.py)."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from medgen_cli.data import sizebins


def _brute(coords, spacing):
    pts = np.asarray(coords, float) * np.asarray(spacing, float)
    return max(cdist(pts[i:i + 500], pts).max() for i in range(0, len(pts), 500)) if len(pts) > 1 else 0.0


def _blobs(shape, seed, sigma, level):
    noise = np.random.default_rng(seed).standard_normal(shape)
    return ndimage.gaussian_filter(noise, sigma) > level


@pytest.mark.parametrize("shape, spacing, sigma", [((96, 96), (0.9375, 1.2), 4.0),
                                                   ((40, 48, 48), (1.0, 0.9375, 0.9375), 3.0)])
def test_feret_is_exact_against_brute_force(shape, spacing, sigma):
    mask = _blobs(shape, 0, sigma, 0.02)
    labels, n = sizebins.label_components(mask)
    sizes = np.bincount(labels.ravel())[1:]
    assert n >= 3 and sizes.max() > 2000  # exercises both the brute-force and the hull path
    got = sizebins.tumour_diameters(mask, spacing)
    want = [_brute(np.argwhere(labels == k), spacing) for k in range(1, n + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_degenerate_components(ndim):
    spacing = (1.0, 0.5, 0.25)[:ndim]
    one = np.zeros((3,) * ndim, bool)
    one[(1,) * ndim] = True
    assert sizebins.tumour_diameters(one, spacing).tolist() == [0.0]
    line = np.argwhere(np.ones((2500,) + (1,) * (ndim - 1), bool))  # colinear, > 2000 points
    assert sizebins.feret_diameter(line, spacing) == pytest.approx(2499 * spacing[0])
    if ndim == 3:
        plate = np.argwhere(np.ones((1, 60, 50), bool))  # coplanar in 3D, > 2000 points
        assert sizebins.feret_diameter(plate, spacing) == pytest.approx(_brute(plate, spacing))


@pytest.mark.parametrize("ndim", [2, 3])
def test_connectivity_is_face_only(ndim):
    diag = np.zeros((3,) * ndim, bool)
    diag[(0,) * ndim] = diag[(1,) * ndim] = True  # touch only at a corner
    assert sizebins.label_components(diag)[1] == 2
    face = np.zeros((3,) * ndim, bool)
    face[(0,) * ndim] = face[(1,) + (0,) * (ndim - 1)] = True
    assert sizebins.label_components(face)[1] == 1
    assert sizebins.tumour_diameters(diag, (1.0,) * ndim).tolist() == [0.0, 0.0]


def test_bin_edges_are_left_closed():
    d = [0.0, 2.999, 3.0, 5.99, 6.0, 10.0, 15.0, 19.99, 20.0, 29.99, 30.0, 100.0]
    assert sizebins.bin_index(d).tolist() == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5, 6, 6]
    assert sizebins.N_BINS == 7


def test_rano_class_edges():
    got = [sizebins.rano_class(d) for d in (0.0, 9.999, 10.0, 19.99, 20.0, 29.99, 30.0, 80.0)]
    assert got == ["tiny", "tiny", "small", "small", "medium", "medium", "large", "large"]


@pytest.mark.parametrize("ndim", [2, 3])
def test_size_bins_counts_and_clamps(ndim):
    spacing = (1.0,) * ndim
    mask = np.zeros((40,) * ndim, bool)
    for k in range(12):  # twelve single voxels → bin 0, clamped to max_count
        mask[(3 * k,) + (0,) * (ndim - 1)] = True
    mask[(slice(5, 9), slice(5, 6)) + (slice(5, 6),) * (ndim - 2)] = True  # 4 voxels along axis 0 → 3 mm
    mask[(slice(0, 40), slice(20, 21)) + (slice(20, 21),) * (ndim - 2)] = True  # 39 mm line → ≥30
    got = sizebins.size_bins(mask, spacing, max_count=10)
    assert got.dtype == np.int64 and got.tolist() == [10, 1, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError):
        sizebins.tumour_diameters(mask, (1.0,) * (ndim + 1))


@pytest.mark.parametrize("shape", [(120, 120), (30, 60, 60)])
def test_compat_sampling_underestimates_deterministically(shape):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(2, s - 2) for s in shape)] = True  # one big box, more points than the subset
    spacing = (1.0,) * len(shape)
    exact = sizebins.tumour_diameters(mask, spacing)[0]
    a = sizebins.tumour_diameters(mask, spacing, compat_sampled=True, seed=3)[0]
    b = sizebins.tumour_diameters(mask, spacing, compat_sampled=True, seed=3)[0]
    assert a == b and a <= exact and a > 0.8 * exact


@pytest.mark.parametrize("ndim, r", [(2, 800), (3, 20)])
def test_large_ball_goes_through_the_hull_and_is_exact(monkeypatch, ndim, r):
    calls = []
    real = sizebins._hull_points
    monkeypatch.setattr(sizebins, "_hull_points", lambda pts: calls.append(len(pts)) or real(pts))
    grid = np.indices((2 * r + 1,) * ndim) - r
    ball = (grid ** 2).sum(axis=0) <= r * r  # contains (±r, 0, …): Feret = 2r exactly
    assert sizebins.tumour_diameters(ball, (0.5,) * ndim)[0] == pytest.approx(r)
    assert calls and calls[0] > 2000
