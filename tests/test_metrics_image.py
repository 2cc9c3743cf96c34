"""PSNR and the SSIM family against hand-computed values and MONAI called directly."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

from medgen_cli.errors import InputError
from medgen_cli.metrics import image as m


def _pair(shape, seed=0, noise=0.1):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(shape, generator=gen)
    out = (ref + noise * torch.randn(shape, generator=gen)).clamp(0, 1)
    return out, ref


# --------------------------------------------------------------------------- PSNR


def test_psnr_hand_computed_value():
    ref = torch.zeros(2, 1, 4, 4)
    gen = ref.clone()
    gen[0] += 0.1  # MSE 0.01 → 20 dB
    gen[1, 0, 0, 0] = 1.0  # MSE 1/16 → 10·log10(16)
    assert torch.allclose(m.psnr(gen, ref), torch.tensor([20.0, 10 * math.log10(16)]), atol=1e-4)


def test_psnr_clamps_and_caps():
    ref = torch.rand(3, 1, 4, 4, 4)
    assert torch.equal(m.psnr(ref, ref), torch.full((3,), 100.0))
    assert torch.equal(m.psnr(ref + 5.0, torch.ones_like(ref)), torch.full((3,), 100.0))  # clamped to 1
    assert torch.allclose(m.psnr(torch.full((1, 1, 2, 2), -3.0), torch.full((1, 1, 2, 2), 0.5)),
                          torch.tensor([10 * math.log10(4)]))


def test_shape_mismatch_says_observed_and_expected():
    with pytest.raises(InputError, match=r"\(1, 1, 8, 8\) vs \(1, 1, 8, 9\)"):
        m.psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(InputError, match="expected a 3D batch"):
        m.msssim_3d(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


# --------------------------------------------------------------------------- MS-SSIM parameters


@pytest.mark.parametrize("side,scales,kernel", [(256, 5, 11), (177, 5, 11), (176, 4, 11), (99, 4, 11),
                                                (89, 4, 9), (88, 3, 11), (45, 3, 11), (44, 2, 11),
                                                (22, 2, 11), (21, 2, 9), (16, 2, 7), (6, 2, 3)])
def test_kernel_scale_rule(side, scales, kernel):
    weights, k = m.msssim_params(side)
    assert (len(weights), k) == (scales, kernel)
    assert math.isclose(sum(weights), 1.0, abs_tol=1e-3 if scales == 5 else 1e-12)
    x, y = _pair((1, 1, side, side))
    assert 0 < float(m.msssim_2d(x, y)) <= 1  # MONAI accepts the size


def test_fewer_scales_keep_the_ratio_of_the_standard_weights():
    w4 = m.msssim_weights(100)
    assert all(math.isclose(a / w4[0], b / m.STANDARD_WEIGHTS[0]) for a, b in zip(w4, m.STANDARD_WEIGHTS))
    assert m.msssim_weights(177) == m.STANDARD_WEIGHTS


def test_too_small_image_is_refused():
    with pytest.raises(InputError, match="smallest side 5 px"):
        m.msssim_2d(torch.zeros(1, 1, 5, 32), torch.zeros(1, 1, 5, 32))


# --------------------------------------------------------------------------- MS-SSIM / SSIM values


def _monai_msssim(gen, ref, dims, weights, kernel=11):
    metric = MultiScaleSSIMMetric(spatial_dims=dims, data_range=1.0, kernel_size=kernel, weights=weights)
    return metric(gen, ref).reshape(-1)


def test_msssim_2d_equals_monai():
    gen, ref = _pair((3, 1, 64, 64))
    expected = _monai_msssim(gen, ref, 2, m.msssim_weights(64))
    assert torch.allclose(m.msssim(gen, ref, spatial_dims=2), expected, atol=1e-6)
    assert m.msssim(gen, ref, 2).shape == (3,)


def test_msssim_3d_equals_monai():
    gen, ref = _pair((2, 1, 48, 48, 48))
    expected = _monai_msssim(gen, ref, 3, m.msssim_weights(48))
    assert torch.allclose(m.msssim_3d(gen, ref), expected, atol=1e-6)


def test_identical_images_score_one():
    for shape in [(2, 1, 48, 48), (2, 2, 180, 180)]:
        x, _ = _pair(shape)
        assert torch.allclose(m.msssim(x, x, 2), torch.ones(2), atol=1e-5)
        assert torch.allclose(m.ssim(x, x, 2), torch.ones(2), atol=1e-5)
    v, _ = _pair((1, 1, 24, 48, 48))
    assert torch.allclose(m.msssim_3d(v, v), torch.ones(1), atol=1e-5)
    assert torch.allclose(m.msssim_slices(v, v), torch.ones(1), atol=1e-5)


def test_worse_reconstruction_scores_lower():
    clean, ref = _pair((1, 1, 64, 64), noise=0.02)
    noisy, _ = _pair((1, 1, 64, 64), noise=0.3)
    assert float(m.msssim(clean, ref, 2)) > float(m.msssim(noisy, ref, 2))
    assert float(m.ssim(clean, ref, 2)) > float(m.ssim(noisy, ref, 2))


def test_slicewise_equals_mean_of_per_slice_2d():
    gen, ref = _pair((2, 1, 5, 48, 48))
    per_slice = torch.stack([m.msssim_2d(gen[:, :, d], ref[:, :, d]) for d in range(5)], dim=1)  # (B, D)
    expected = per_slice.mean(1)
    assert torch.allclose(m.msssim_slices(gen, ref), expected, atol=1e-6)
    assert torch.allclose(m.msssim_slices(gen, ref, chunk=3), expected, atol=1e-6)
    assert torch.allclose(m.msssim(gen, ref, spatial_dims=3), expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 1, 16, 32, 32)])
def test_ssim_equals_monai_2d_and_3d(shape):
    gen, ref = _pair(shape)
    dims = len(shape) - 2
    expected = SSIMMetric(spatial_dims=dims, data_range=1.0, win_size=11)(gen, ref).reshape(-1)
    assert torch.allclose(m.ssim(gen, ref, dims), expected, atol=1e-6)


def test_ssim_small_image_uses_smaller_kernel():
    gen, ref = _pair((1, 1, 8, 8))
    expected = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=7)(gen, ref).reshape(-1)
    assert torch.allclose(m.ssim(gen, ref, 2), expected, atol=1e-6)


def test_lazy_package_exports():
    import medgen_cli.metrics as metrics

    assert metrics.psnr is m.psnr and metrics.msssim_3d is m.msssim_3d
    with pytest.raises(AttributeError):
        metrics.fid  # noqa: B018


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    gen, ref = _pair((2, 1, 6, 48, 48))
    for fn in (m.psnr, m.msssim_slices, m.msssim_3d):
        on_gpu = fn(gen.cuda(), ref.cuda())
        assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), fn(gen, ref), atol=1e-5)
    assert torch.allclose(m.ssim(gen.cuda(), ref.cuda(), 3).cpu(), m.ssim(gen, ref, 3), atol=1e-5)
