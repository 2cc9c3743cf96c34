"""Normalisation, resize, depth pad/trim (data/preprocess.py) and the volume cache (data/cache.py)."""

import os

import numpy as np
import pytest
import torch

from medgen_cli.data import cache, preprocess
from medgen_cli.errors import UsageError


def test_minmax_scales_to_unit_range_and_constant_gives_zeros():
    vol = np.array([[[2.0, 4.0], [6.0, 10.0]]])  # (1, 2, 2)
    out = preprocess.minmax(vol)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out.ravel(), [0, 0.25, 0.5, 1.0])
    assert not preprocess.minmax(np.full((3, 4, 4), 7.0)).any()


def test_global_percentile_clips_per_modality():
    vol = np.array([-5.0, 0.0, 2949.0, 5898.0, 9000.0])
    np.testing.assert_allclose(preprocess.normalize(vol, "global_percentile", "bravo"), [0, 0, 0.5, 1, 1], atol=1e-6)
    with pytest.raises(UsageError, match="flair"):
        preprocess.normalize(vol, "global_percentile", "flair")
    with pytest.raises(UsageError, match="unknown normalization"):
        preprocess.normalize(vol, "zscore", "bravo")


@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 8, 6)])  # 2D (one slice) and 3D
def test_resize_mask_stays_binary_and_identity_when_same_size(shape):
    rng = np.random.default_rng(0)
    mask = (rng.random(shape) > 0.6).astype(np.float32)
    down = preprocess.resize_inplane(mask, 4, is_mask=True)
    up = preprocess.resize_inplane(mask, (12, 9), is_mask=True)
    assert down.shape == (shape[0], 4, 4) and up.shape == (shape[0], 12, 9)
    assert set(np.unique(down)) <= {0.0, 1.0} and set(np.unique(up)) <= {0.0, 1.0}
    np.testing.assert_array_equal(preprocess.resize_inplane(mask, shape[1:], is_mask=True), mask)


def test_resize_image_area_averages_blocks():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)  # (D, H, W)
    out = preprocess.resize_inplane(img, 2, is_mask=False)
    np.testing.assert_allclose(out[0], [[2.5, 4.5], [10.5, 12.5]])


def test_resized_spacing_scales_in_plane_only():
    assert preprocess.resized_spacing((0.9375, 0.9375, 1.0), (256, 256), 128) == (1.875, 1.875, 1.0)
    assert preprocess.resized_spacing((1.0, 2.0, 3.0), (10, 20), (20, 10)) == (0.5, 4.0, 3.0)


@pytest.mark.parametrize("shape", [(3, 2, 2), (2, 3, 2, 2)])  # (D, H, W) and (C, D, H, W)
def test_pad_then_trim_round_trip(shape):
    vol = np.random.default_rng(1).random(shape).astype(np.float32)
    rep = preprocess.pad_depth(vol, 5, "replicate")
    zero = preprocess.pad_depth(vol, 5, "constant")
    assert rep.shape[-3] == 5 and zero.shape[-3] == 5
    np.testing.assert_array_equal(rep[..., 3:, :, :], np.repeat(vol[..., -1:, :, :], 2, axis=-3))
    assert not zero[..., 3:, :, :].any()
    np.testing.assert_array_equal(preprocess.trim_depth(rep, 3), vol)
    t = preprocess.trim_depth(torch.from_numpy(zero), 3)  # torch works too
    np.testing.assert_array_equal(t.numpy(), vol)
    with pytest.raises(ValueError):
        preprocess.pad_depth(vol, 2)
    with pytest.raises(UsageError):
        preprocess.pad_depth(vol, 5, "reflect")


# --- cache -----------------------------------------------------------------------------------


def _counter():
    calls = []

    def compute(value):
        def f():
            calls.append(value)
            return np.full((2, 3), value, np.float32)
        return f
    return calls, compute


def test_cache_hit_and_invalidation_on_changed_source(tmp_path):
    src = tmp_path / "vol.bin"
    src.write_bytes(b"abc")
    calls, compute = _counter()
    a = cache.cached(src, {"size": 4}, compute(1.0), cache_dir=tmp_path / "c")
    b = cache.cached(src, {"size": 4}, compute(2.0), cache_dir=tmp_path / "c")
    assert calls == [1.0] and (a == b).all()
    cache.cached(src, {"size": 8}, compute(3.0), cache_dir=tmp_path / "c")  # other params → other key
    st = src.stat()
    src.write_bytes(b"abd")  # same size: only the mtime differs
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    c = cache.cached(src, {"size": 4}, compute(4.0), cache_dir=tmp_path / "c")
    assert calls == [1.0, 3.0, 4.0] and (c == 4.0).all()
    entries = list((tmp_path / "c").rglob("*.npy"))
    assert len(entries) == 3 and not list((tmp_path / "c").rglob(".tmp-*"))
    assert np.load(entries[0], allow_pickle=False).dtype == np.float32


def test_cache_works_with_read_only_data_and_can_be_disabled(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    src = data / "vol.bin"
    src.write_bytes(b"x")
    data.chmod(0o555)
    try:
        monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "env-cache"))
        calls, compute = _counter()
        cache.cached(src, {}, compute(1.0))  # default folder from $MEDGEN_CACHE
        cache.cached(src, {}, compute(2.0))
        assert calls == [1.0] and list((tmp_path / "env-cache").rglob("*.npy"))
        assert [p.name for p in data.iterdir()] == ["vol.bin"]
        cache.cached(src, {}, compute(3.0), cache_dir=False)
        cache.cached(src, {}, compute(4.0), cache_dir="off")
        assert calls == [1.0, 3.0, 4.0]
    finally:
        data.chmod(0o755)


def test_unwritable_cache_folder_only_costs_speed(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    src = tmp_path / "vol.bin"
    src.write_bytes(b"x")
    calls, compute = _counter()
    out = cache.cached(src, {}, compute(5.0), cache_dir=tmp_path / "file" / "cache")
    assert (out == 5.0).all() and calls == [5.0]


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    src = tmp_path / "vol.bin"
    src.write_bytes(b"x")
    entry = cache.entry_path(tmp_path / "c", cache.cache_key(src, {}))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"torn")
    calls, compute = _counter()
    assert (cache.cached(src, {}, compute(6.0), cache_dir=tmp_path / "c") == 6.0).all()
    assert (np.load(entry) == 6.0).all()
