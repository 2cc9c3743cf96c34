"""Pixel-space transforms (spaces.py): exact inverses, Haar sub-bands, statistics, presets, CLI."""

from __future__ import annotations

import json
import math

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F

from medgen_cli.config import load
from medgen_cli.errors import ConfigError
from medgen_cli.spaces import Space, dwt, estimate_stats, haar_matrix, space_to_depth, subband_names


def _toy(dims: int, c: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((2, c) + ((8, 12) if dims == 2 else (4, 6, 8)), generator=g)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind, rescale, stats", [("s2d", False, False), ("s2d", True, False),
                                                  ("wavelet", False, False), ("wavelet", True, True)])
def test_decode_inverts_encode(dims, kind, rescale, stats):
    x = _toy(dims)
    k = 2**dims
    mean, std = ([0.1 * i for i in range(2 * k)], [0.5 + 0.1 * i for i in range(2 * k)]) if stats else (None, None)
    sp = Space(kind, dims, rescale, mean, std)
    z = sp.encode(x)
    assert tuple(z.shape) == (2, 2 * k) + tuple(s // 2 for s in x.shape[2:]) == (2, *sp.shape(x.shape[1:]))
    assert torch.allclose(sp.decode(z), x, atol=1e-6)


def test_s2d_is_pixel_unshuffle_and_3d_layout():
    x = _toy(2, 3)
    assert torch.equal(space_to_depth(x, 2), F.pixel_unshuffle(x, 2))  # 2D: torch's own, channel-major
    v = torch.arange(2 * 4 * 4 * 4.0).reshape(1, 2, 4, 4, 4)
    z = space_to_depth(v, 3)  # [B, C, D, H, W] -> [B, 8C, D/2, H/2, W/2]
    assert z.shape == (1, 16, 2, 2, 2)
    # channel c*8 + (rd*4 + rh*2 + rw) holds v[c, 2d+rd, 2h+rh, 2w+rw]
    assert z[0, 1 * 8 + 5, 1, 0, 1] == v[0, 1, 3, 0, 3]


@pytest.mark.parametrize("dims", [2, 3])
def test_haar_constant_volume_is_all_lll_and_energy_is_kept(dims):
    x = torch.full((1, 1) + ((4, 4) if dims == 2 else (4, 4, 4)), 0.7)
    z = dwt(x, dims)
    assert torch.allclose(z[:, 0], torch.full_like(z[:, 0], 0.7 * 2 ** (dims / 2)))  # LL(L) = c·√(2^dims)
    assert z[:, 1:].abs().max() < 1e-6
    y = _toy(dims)
    assert float((dwt(y, dims) ** 2).sum()) == pytest.approx(float((y**2).sum()), rel=1e-6)  # orthonormal
    m = haar_matrix(dims)
    assert torch.allclose(m @ m.t(), torch.eye(2**dims, dtype=m.dtype))
    assert subband_names(dims)[0] == "L" * dims and subband_names(dims)[-1] == "H" * dims


def test_haar_highpass_sees_a_depth_edge():
    """A volume that alternates along depth only is all in the H-along-d band (channel 0b100 = HLL)."""
    x = -torch.ones(1, 1, 4, 4, 4)
    x[:, :, ::2] = 1.0  # +1/-1 along d, zero mean
    z = dwt(x, 3)
    energy = (z**2).sum(dim=(0, 2, 3, 4))
    assert subband_names(3)[4] == "HLL" and energy.argmax() == 4 and energy[4] == pytest.approx(float(energy.sum()))


def test_estimated_stats_standardise_the_subbands():
    items = [{"image": _toy(3, 1)[0] * (1 + i)} for i in range(5)]
    plain = Space("wavelet", 3, rescale=True)
    mean, std, n = estimate_stats(plain, items, max_items=200)
    assert n == 5 and len(mean) == 8
    sp = Space("wavelet", 3, True, mean, std)
    z = torch.cat([sp.encode(it["image"][None]) for it in items])  # (5, 8, ...)
    assert z.transpose(0, 1).reshape(8, -1).mean(1).abs().max() < 1e-5
    assert torch.allclose(z.transpose(0, 1).reshape(8, -1).std(1, unbiased=False), torch.ones(8), atol=1e-4)
    _, _, n = estimate_stats(plain, items, max_items=3)
    assert n == 3


def test_presets_feed_space_channels_and_shift():
    from medgen_cli.jobs.build import build_strategy, model_args, space_shape

    p = load("3d-s2d-128").preset
    _, kw = model_args(p)
    assert (kw["in_channels"], kw["out_channels"]) == (16, 8) and space_shape(p) == (8, 80, 64, 64)
    assert build_strategy(p).shift == 1.0  # medgen: the intended r = 1
    q = load("3d-wavelet-128", ["compat.pixel_base_shift=true"]).preset
    assert build_strategy(q).shift == 0.5  # the reference's pixel-size base: r = 1/2
    d = load("3d-dit-b-128", ["space.kind=s2d"]).preset  # DiT in a space: tokens of the encoded volume
    _, kw = model_args(d)
    assert kw["input_size"] == (80, 64, 64) and kw["in_channels"] == 16


def test_space_config_errors():
    with pytest.raises(ConfigError) as e:
        load("3d-s2d-128", ["space.normalize=true"])
    assert "space.normalize is defined for the wavelet space" in "\n".join(e.value.details)
    with pytest.raises(ConfigError) as e:
        load("3d-s2d-128", ["data.image_size=48"])  # 48 / 2 is not divisible by 16
    assert "the s2d space's 2 x the model's down-sampling factor 32" in "\n".join(e.value.details)
    with pytest.raises(ConfigError):
        load("3d-wdm-ddpm-128", ["compat.pixel_base_shift=true"])  # a DDPM model has no rflow shift
    from medgen_cli.jobs.build import build_space

    with pytest.raises(ConfigError, match="statistics are missing"):
        build_space(load("3d-wavelet-128", ["space.normalize=true"]).preset)


SPACE = ["--set", "model.channels=[16,16]", "--set", "model.num_head_channels=16", "--set", "space.rescale=true"]


@pytest.mark.parametrize("dims, kind", [(2, "s2d"), (3, "wavelet")])
def test_train_sample_eval_in_a_space(cli, tiny_preset, phantom_root, tmp_path, dims, kind):
    run, out = tmp_path / "run", tmp_path / "samples"
    extra = ["--set", "space.normalize=true"] if kind == "wavelet" else []
    r = cli("train", "--preset", tiny_preset(dims), "--data", phantom_root, "--run-dir", run, "--max-steps", 2,
            "--json", "--set", f"space.kind={kind}", *SPACE, *extra)
    assert r.code == 0, r.err
    space = json.loads((run / "config.json").read_text())["preset"]["space"]
    if kind == "wavelet":  # estimated once, stored with the run: sampling and eval reuse it
        assert space["stats"]["items"] == 3 and len(space["stats"]["mean"]) == 2**dims
        assert all(math.isfinite(v) and v > 0 for v in space["stats"]["std"])
    r = cli("sample", "--run", run, "--out", out, "--n", 1, "--steps", 2, "--json")
    assert r.code == 0, r.err
    img = nib.load(json.loads(r.out.splitlines()[0])["path"])
    assert img.shape == ((16, 16) if dims == 2 else (16, 16, 16))  # decoded back to pixels
    r = cli("eval", "psnr", "--run", run, "--json")
    assert r.code == 0, r.err
