"""FID/KID/CMMD formulas against torchmetrics and direct implementations; FID separates phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen_cli.metrics import distribution as D


def _feats(seed, n=120, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ a + shift).astype(np.float32)


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_fid_equals_torchmetrics(shift):
    from torchmetrics.image.fid import _compute_fid

    x, y = _feats(0), _feats(1, n=150, shift=shift)
    tx, ty = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    ref = _compute_fid(tx.mean(0), torch.cov(tx.T), ty.mean(0), torch.cov(ty.T)).item()
    ours = D.fid(x, y).value
    assert abs(ours - ref) <= 1e-4 * abs(ref)


def test_kid_equals_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    x, y = _feats(2, n=80), _feats(3, n=80, shift=0.3)
    km = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=80)
    km.update(torch.from_numpy(y).double(), real=True)
    km.update(torch.from_numpy(x).double(), real=False)
    ref = km.compute()[0].item()
    for protocol in D.PROTOCOLS:  # one subset of everything: the draw does not matter
        ours = D.kid(x, y, protocol, subsets=1, subset_size=80).value
        assert abs(ours - ref) <= 1e-4 * abs(ref)


def test_kid_protocol_numbers():
    x, y = _feats(4, n=300), _feats(5, n=250)
    r, s = D.kid(x, y, "reference", seed=1), D.kid(x, y, "standard", seed=1)
    assert (r.detail["subsets"], r.detail["subset_size"]) == (50, 100)
    assert (s.detail["subsets"], s.detail["subset_size"]) == (100, 250)
    assert D.kid(x, y, "reference", seed=1).value == r.value  # seeded


def _direct_cmmd(x, y, sigma, unbiased):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    m, n = len(x), len(y)
    if unbiased:
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    else:
        kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m)) / m**2
        kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n)) / n**2
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_cmmd_equals_direct_formula():
    x, y = _feats(6, n=30).astype(np.float64), _feats(7, n=25, shift=0.4).astype(np.float64)
    std = D.cmmd(x, y, "standard")
    assert std.value == pytest.approx(1000 * _direct_cmmd(x, y, 10.0, False), rel=1e-6)
    ref = D.cmmd(x, y, "reference", seed=0)
    sigma = ref.detail["sigma"]  # all rows (< 500 per side) enter the median
    xn, yn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
    z = np.concatenate([xn, yn])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    assert sigma == pytest.approx(max(np.median(dists), 0.1), rel=1e-9)
    assert ref.value == pytest.approx(np.sqrt(max(_direct_cmmd(x, y, sigma, True), 0)), rel=1e-6)


def test_phantom_fid_separates_shift():
    """≥ 500 phantom slices per side: FID(same distribution) < 0.2 × FID(shifted)."""
    from medgen_cli.data.phantom import synth_patient
    from medgen_cli.data.preprocess import minmax
    from medgen_cli.metrics.features import Extractor

    # a fixed, transparent "feature network": 4x4 patch means of one channel (16-d)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1, bias=False), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())
    torch.nn.init.constant_(net[0].weight, 1 / 3)
    ext = Extractor("patch-means", 16, net.eval(), 32, (0.0,) * 3, (1.0,) * 3, "-", "-", "fp32", torch.device("cpu"))

    def slices(seeds, gamma=1.0):
        vols = [minmax(synth_patient(s, size=32, depth=16)[0]["bravo"]) ** gamma for s in seeds]
        return torch.from_numpy(np.concatenate([np.transpose(v, (2, 0, 1)) for v in vols]))[:, None]

    a = ext(slices(range(0, 34))).numpy()
    b = ext(slices(range(100, 134))).numpy()
    c = ext(slices(range(200, 234), gamma=2.0)).numpy()
    assert len(a) >= 500
    same, shifted = D.fid(a, b).value, D.fid(a, c).value
    assert same < 0.2 * shifted, (same, shifted)


def test_fid_torch_path_equals_numpy():
    from medgen_cli.metrics import distribution as D

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 24)), rng.normal(0.3, 1.2, size=(200, 24))
    assert D.fid(a, b, device="cpu").value == pytest.approx(D.fid(a, b).value, rel=1e-9)
