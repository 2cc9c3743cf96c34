"""The fast reference/generated reader (worker processes, device-side normalisation) equals the plain nibabel path."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from medgen_cli.data.nifti import write_nifti
from medgen_cli.errors import InputError
from medgen_cli.jobs import evaluate as job
from medgen_cli.metrics import reader


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
    e = rng.integers(0, 65535, (12, 10, 6)).astype(np.uint16)  # unsigned: travels as int16 bits, widened
    nib.save(nib.Nifti1Image(e, np.eye(4)), tmp_path / "e.nii.gz")
    files.append(tmp_path / "e.nii.gz")
    hdr = nib.Nifti1Header(endianness=">")  # big-endian file
    nib.save(nib.Nifti1Image(a[..., :5].astype(">f4"), np.eye(4), hdr), tmp_path / "f.nii.gz")
    files.append(tmp_path / "f.nii.gz")
    for p in files:  # every one of these takes the fast path (no nibabel in the reader)
        got = reader.read_voxels(p, 150)
        assert got is not None and reader.peek_shape(p, 150) == got[0].shape
    for role, planes, depth, binary in (("ref", "axial", 8, False), ("gen", "tri", 150, False),
                                        ("gen", "axial", None, True), ("ref", "tri", 6, False)):
        f, g = job.extract(files, Pixels(), role, planes, depth, binary, workers=workers, batch=4)
        ef, eg = _expected(files, role, planes, depth, binary)
        assert f.shape == ef.shape and (g == eg).all()
        np.testing.assert_allclose(f, ef, rtol=1e-6, atol=1e-6)


def test_fast_reader_2d_and_bad_voxels(tmp_path):
    img2d = np.random.default_rng(1).random((16, 12)).astype(np.float32)
    p2 = write_nifti(tmp_path / "s.nii.gz", img2d, spacing=(1, 1, 1))
    assert reader.peek_shape(p2) == reader.read_voxels(p2)[0].shape == (1, 12, 16)
    assert reader.peek_shape(tmp_path / "none.nii.gz") is None
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
    with pytest.raises(InputError, match="not found"):  # e.g. a sample record naming a deleted file
        job.extract([p2, tmp_path / "gone.nii.gz"], Pixels(), "gen", workers=2)


def test_reference_cache_key_is_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(2).random((8, 8, 4)).astype(np.float32)
    p = write_nifti(tmp_path / "r" / "bravo.nii.gz", x, spacing=(1, 1, 1))
    ext = Pixels()
    ext.name, ext.sha256, ext.preprocessing = "pixels", "0" * 64, "none"
    f, _, hit = job.reference_features([p], ext, "axial", 150)
    assert not hit
    from medgen_cli.metrics.weights import known_sha256

    assert known_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()  # hashed by a reader, memoised
    job.wait_cache_writes()
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1
    moved = tmp_path / "elsewhere.nii.gz"
    moved.write_bytes(p.read_bytes())  # same content, other path and mtime
    f2, _, hit = job.reference_features([moved], ext, "axial", 150)
    assert hit and np.array_equal(f, f2)
    write_nifti(moved, x * 0.5 + 0.1, spacing=(1, 1, 1))  # new content under the same path
    _, _, hit = job.reference_features([moved], ext, "axial", 150)
    assert not hit


def _nibabel_layout(path):
    import gzip

    import nibabel as nib
    from nibabel.nifti1 import Nifti1Header

    raw = Path(path).read_bytes()
    hdr = Nifti1Header.from_fileobj(io.BytesIO(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw))
    data = np.asanyarray(nib.load(path).dataobj.get_unscaled())
    return hdr, data


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2", ">u2", "<u1", "<i1", "<i4", "<u4", "<f8", "<i8"])
def test_header_parser_agrees_with_nibabel(tmp_path, dtype):
    import nibabel as nib

    rng = np.random.default_rng(5)
    arr = (rng.random((7, 6, 5)) * 100).astype(dtype)
    hdr = nib.Nifti1Header(endianness=dtype[0])
    hdr.set_data_dtype(np.dtype(dtype))
    img = nib.Nifti1Image(arr, np.diag([0.5, 0.7, 2.0, 1.0]), hdr)
    if np.dtype(dtype).kind in "iu":
        img.header.set_slope_inter(0.25, -3.0)
    path = tmp_path / "v.nii.gz"
    nib.save(img, path)
    want_hdr, want = _nibabel_layout(path)
    got, slope, inter = reader.read_voxels(path, 3)
    assert got.dtype == want.dtype.newbyteorder("=") and got.shape == (3, 6, 7) and got.flags.writeable
    assert np.array_equal(got, want[..., :3].T)
    assert (slope, inter) == want_hdr.get_slope_inter()
    assert reader.uncompressed_size(path) >= got.nbytes
    assert reader.peek_shape(path, 3) == got.shape and reader.peek_shape(path) == (5, 6, 7)  # header only


def test_header_parser_refuses_what_it_does_not_know(tmp_path):
    import nibabel as nib

    arr = np.zeros((4, 4, 3), np.float32)
    nib.save(nib.Nifti1Pair(arr, np.eye(4)), tmp_path / "pair.img")  # two-file NIfTI: nibabel reads it
    assert reader.read_voxels(tmp_path / "pair.hdr") is None
    rgb = np.zeros((4, 4, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    assert reader.read_voxels(tmp_path / "rgb.nii") is None
    raw = bytearray((tmp_path / "pair.hdr").read_bytes())
    img = nib.Nifti1Image(arr, np.eye(4))
    nib.save(img, tmp_path / "ok.nii")
    raw = bytearray((tmp_path / "ok.nii").read_bytes())
    assert reader.read_voxels(tmp_path / "ok.nii") is not None
    bad = raw.copy()
    bad[108:112] = np.float32(0).tobytes()  # vox_offset inside the header
    (tmp_path / "off.nii").write_bytes(bad)
    assert reader.read_voxels(tmp_path / "off.nii") is None
    bad = raw.copy()
    bad[112:120] = np.array([2.0, np.inf], np.float32).tobytes()  # valid slope, infinite intercept
    (tmp_path / "inter.nii").write_bytes(bad)
    assert reader.read_voxels(tmp_path / "inter.nii") is None
    (tmp_path / "short.nii").write_bytes(raw[:400])  # truncated data
    assert reader.read_voxels(tmp_path / "short.nii") is None
    bad = raw.copy()
    bad[112:116] = np.float32(0).tobytes()  # slope 0: no scaling, as nibabel says
    (tmp_path / "s0.nii").write_bytes(bad)
    assert reader.read_voxels(tmp_path / "s0.nii")[1:] == (None, None)


def test_zlib_and_isal_inflate_alike(tmp_path):
    x = np.random.default_rng(3).random((9, 8, 7)).astype(np.float32)
    p = write_nifti(tmp_path / "v.nii.gz", x)
    a = reader.read_voxels(p, None, "zlib")
    assert reader.inflater("zlib") == "zlib"
    b = reader.read_voxels(p, None, "auto")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[0], x.T)


@pytest.mark.parametrize("how", ["zlib", "auto"])
def test_inflate_reads_every_gzip_member(how):
    """One member inflates into a buffer of the trailer's size; several members (as bgzip writes,
    ending with an empty one) or a wrong trailer still give the whole content."""
    import gzip

    data = np.random.default_rng(5).integers(0, 7, 300_000).astype(np.uint8).tobytes()
    one = gzip.compress(data)
    assert reader.inflate(one, how) == data
    members = gzip.compress(data[:100_000]) + gzip.compress(data[100_000:]) + gzip.compress(b"")
    assert reader.inflate(members, how) == data
    lying = one[:-4] + (123).to_bytes(4, "little")  # a trailer ISIZE that does not match
    with pytest.raises(Exception):  # the CRC/size check of the full decompressor still runs
        reader.inflate(lying, how)
    equal_sized = gzip.compress(data[:150_000]) + gzip.compress(data[150_000:])  # first size == last trailer
    assert data.startswith(reader.inflate(equal_sized, how))  # a prefix at worst: lengths are checked after


def test_pool_falls_back_to_nibabel_when_a_file_does_not_fit_or_a_worker_dies(tmp_path):
    if not reader.HAVE_MEMFD:
        pytest.skip("no memfd: the reader uses threads here")
    rng = np.random.default_rng(4)
    files = [write_nifti(tmp_path / f"{i}.nii.gz", rng.random((128, 128, 4 + i)).astype(np.float32)) for i in range(4)]
    def read_all(pool):
        got = {}
        for i, v in reader.open_source(files, None, 1, pool, "t"):
            if v.array is not None:
                assert np.array_equal(v.array, reader.read_voxels(files[i])[0])
            got[i] = (v.array is None, v.reason)
            v.release()
        return got

    with reader.ReaderPool(1, slot_bytes=128 * 128 * 5 * 4, slots=2) as pool:  # fits 5 slices, not 6 or 7
        got = read_all(pool)
        assert [got[i][0] for i in range(4)] == [False, False, True, True] and "do not fit" in got[2][1]
        with pytest.raises(RuntimeError, match="held"):  # a caller keeping every slot is told, not left waiting
            list(reader.open_source(files, None, 1, pool, "u"))
    with reader.ReaderPool(2, slot_bytes=128 * 128 * 7 * 4, slots=3) as pool:
        pool.procs[0].kill()
        pool.procs[0].wait()
        assert sorted(read_all(pool)) == [0, 1, 2, 3]
    # the extraction reads whatever the pool gave back with nibabel: same features
    f, g = job.extract(files, Pixels(), "ref", depth=None, workers=1)
    ef, eg = _expected(files, "ref", "axial", None)
    np.testing.assert_allclose(f, ef, rtol=1e-6, atol=1e-6)


def test_pool_digests_go_ahead_of_reads_and_name_what_failed(tmp_path):
    if not reader.HAVE_MEMFD:
        pytest.skip("no memfd: the reader uses threads here")
    files = [write_nifti(tmp_path / f"{i}.nii.gz", np.full((16, 16, 3), i, np.float32)) for i in range(3)]
    want = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    with reader.ReaderPool(2, slot_bytes=16 * 16 * 3 * 4, slots=1) as pool:
        for i, f in enumerate(files):  # reads queued behind one slot: the digests must not wait for them
            pool.submit(("r", i), f, None)
        assert pool.digests(files + [tmp_path / "gone.nii.gz"]) == want + [None]
        assert sorted(v.key for v in pool.take([("r", i) for i in range(3)]) if not v.release()) == \
            [("r", 0), ("r", 1), ("r", 2)]
        for p in pool.procs:
            p.kill()
            p.wait()
        assert pool.digests(files[:1]) == [None]  # no worker left: the caller hashes it itself
    assert job._file_identity(files) == [w.split(":")[0] for w in want]


def test_pool_discard_gives_every_slot_back(tmp_path, monkeypatch):
    """Reads queued ahead (while a cache lookup hashes the files) are dropped on a hit, slots and all."""
    if not reader.HAVE_MEMFD:
        pytest.skip("no memfd: the reader uses threads here")
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    files = [write_nifti(tmp_path / f"{i}.nii.gz", rng.random((32, 32, 4)).astype(np.float32)) for i in range(6)]

    def drained(pool):
        while pool.busy:
            pool._poll()
        return not pool.pending() and len(pool.free) == pool.nslots

    with reader.ReaderPool(2, slot_bytes=32 * 32 * 4 * 4, slots=3) as pool:
        keys = pool.submit_files(files, None, "x")
        assert pool.submit_files(files, None, "x") == keys and len(pool.pending()) == 6  # not twice
        pool._poll()  # some finished, some running, some queued
        pool.discard(keys)
        assert drained(pool)
        for i, v in reader.open_source(files, None, 2, pool, "y"):  # the pool reads on as before
            assert np.array_equal(v.array, reader.read_voxels(files[i])[0])
            v.release()
        ext = Pixels()
        ext.name, ext.sha256, ext.preprocessing = "pixels", "0" * 64, "none"
        f, _, hit = job.reference_features(files, ext, "axial", 150, pool=pool)  # new files: read while hashed
        assert not hit and drained(pool)
        np.testing.assert_allclose(f, _expected(files, "ref", "axial", 150)[0], rtol=1e-6, atol=1e-6)
        job.wait_cache_writes()
        copies = []
        for i, p in enumerate(files):
            copies.append(tmp_path / "copy" / p.name)
            copies[-1].parent.mkdir(exist_ok=True)
            copies[-1].write_bytes(p.read_bytes())
        f2, _, hit = job.reference_features(copies, ext, "axial", 150, pool=pool)  # read ahead, then a hit
        assert hit and np.array_equal(f, f2) and drained(pool)

    class Counting(Pixels):
        volumes = 0

        def __call__(self, x):
            Counting.volumes += 1
            return super().__call__(x)

    ext = Counting()
    ext.name, ext.sha256, ext.preprocessing = "pixels", "0" * 64, "none"
    for p in copies:
        (tmp_path / "again").mkdir(exist_ok=True)
        (tmp_path / "again" / p.name).write_bytes(p.read_bytes())
    # one reader: it hashes every file right after the first read, so the hit is known by the second volume
    with reader.ReaderPool(1, slot_bytes=32 * 32 * 4 * 4, slots=3) as pool:
        f3, _, hit = job.reference_features(sorted((tmp_path / "again").iterdir()), ext, "axial", 150, pool=pool)
        assert hit and np.array_equal(f, f3) and Counting.volumes <= 2 and drained(pool)


def test_reader_worker_starts_without_numpy():
    """Workers import the reader module and the standard library only (~0.05 s, numpy alone is ~0.2 s)."""
    import subprocess
    import sys

    code = ("import sys, medgen_cli.metrics.reader; "
            "print([m for m in ('numpy', 'torch', 'nibabel') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=reader._worker_env())
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.gpu
def test_cuda_reader_path_and_graphs(tmp_path, monkeypatch):
    """On CUDA: the device-side path equals nibabel + CPU (pixels), and graph replay equals the eager forward."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from medgen_cli.metrics import features, nets

    class CudaPixels(Pixels):
        device = torch.device("cuda")

        def __call__(self, x):
            return super().__call__(x.to(self.device))

    rng = np.random.default_rng(7)
    files = [write_nifti(tmp_path / f"{i}.nii.gz", rng.random((40, 36, 12)).astype(np.float32) * 2) for i in range(3)]
    import nibabel as nib

    nib.save(nib.Nifti1Image(rng.integers(0, 65535, (40, 36, 9)).astype(np.uint16), np.eye(4)), tmp_path / "u.nii.gz")
    files.append(tmp_path / "u.nii.gz")
    for role, planes in (("ref", "tri"), ("gen", "axial")):
        f, g = job.extract(files, CudaPixels(), role, planes, 10, workers=2, batch=5)
        ef, eg = _expected(files, role, planes, 10)
        assert (g == eg).all()
        np.testing.assert_allclose(f, ef, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ck = tmp_path / "torch" / "hub" / "checkpoints"
    ck.mkdir(parents=True)
    torch.save(nets.ResNet50().state_dict(), ck / features.RESNET50_FILE)
    ext = features.load("resnet50-imagenet", device="cuda")
    eager, _ = job.extract(files, ext, "ref", "tri", 10, workers=2, graph=False)
    graphed, _ = job.extract(files, ext, "ref", "tri", 10, workers=2, graph=True)
    assert not ext.graph_info.get("off"), ext.graph_info
    assert len(ext.graph_info["checks"]) >= 2  # axial and side stacks have their own graphs
    np.testing.assert_allclose(graphed, eager, rtol=1e-3, atol=1e-3 * (1 + np.abs(eager).max()))
    # a first build through the cache path: the graph is captured in a thread while the files are hashed
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    fresh = features.load("resnet50-imagenet", device="cuda")
    ref, _, hit = job.reference_features(files, fresh, "tri", 10, workers=2, graph=True)
    assert not hit and fresh._warming is None and not fresh.graph_info.get("off"), fresh.graph_info
    assert fresh.graph_info["checks"][0]["shape"] == [10, 1, 40, 36]  # the warm-up's, from the first header
    np.testing.assert_allclose(ref, eager, rtol=1e-3, atol=1e-3 * (1 + np.abs(eager).max()))
