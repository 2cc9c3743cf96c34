"""DiT/SiT (models/dit.py): sizes against the reference, adaLN-Zero, golden values, 2D + 3D training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgen_cli.errors import ConfigError
from medgen_cli.models.dit import DiT, build_dit, sincos_table
from medgen_cli.models.registry import build_model, count_parameters


def _tiny(dims: int, **kw) -> DiT:
    size = (8, 8) if dims == 2 else (4, 8, 8)
    return build_dit(dims, size, 2, 1, hidden_size=32, depth=2, num_heads=2, patch_size=2, **kw)


@pytest.mark.parametrize("dims, size, cin, cout, variant, p, doc", [
    (3, (160, 128, 128), 2, 1, "B", 8, 134.5e6),  # exp7: "DiT-B p8 3D = 134-135M"
    (3, (40, 64, 64), 8, 4, "S", 2, 40e6),  # exp13: "DiT-S p2 latent = 40M"
    (3, (160, 8, 8), 64, 32, "B", 1, 137e6),  # 3D exp10_1: SiT-B p1 on the DC-AE latent "≈137M"
])
def test_parameter_counts_match_the_reference_on_meta(dims, size, cin, cout, variant, p, doc):
    n = count_parameters("dit", spatial_dims=dims, input_size=size, in_channels=cin, out_channels=cout,
                         variant=variant, patch_size=p)
    assert abs(n / doc - 1) < 0.02, f"{n / 1e6:.2f}M"


@pytest.mark.parametrize("variant, p, size", [("S", 2, 128), ("B", 2, 128), ("S", 4, 256), ("L", 2, 128)])
def test_parameter_count_formula_2d(variant, p, size):
    """Exact count: blocks 12E²+... per the layout, learnable N×E table (N = 4096 tokens here)."""
    e, depth = {"S": (384, 12), "B": (768, 12), "L": (1024, 24)}[variant]
    hd = e // {"S": 6, "B": 12, "L": 16}[variant]
    # attention, MLP, adaLN, QK-norm
    block = (3 * e * e + 3 * e) + (e * e + e) + (8 * e * e + 5 * e) + (6 * e * e + 6 * e) + 4 * hd
    tokens = (size // p) ** 2
    extra = (256 * e + e + e * e + e) + (2 * p * p * e + e) + tokens * e + (2 * e * e + 2 * e + e * p * p + p * p)
    n = count_parameters("dit", spatial_dims=2, input_size=(size, size), in_channels=2, out_channels=1,
                         variant=variant, patch_size=p)
    assert n == depth * block + extra


@pytest.mark.parametrize("dims", [2, 3])
def test_adaln_zero_identity_at_init_and_shapes(dims):
    torch.manual_seed(0)
    m = _tiny(dims)
    x = torch.randn((2, 2) + ((8, 8) if dims == 2 else (4, 8, 8)))
    y = m(x, torch.tensor([3.0, 900.0]))
    assert y.shape == (2, 1) + x.shape[2:] and torch.count_nonzero(y) == 0  # zero-init final layer
    assert all(torch.count_nonzero(b.ada[-1].weight) == 0 for b in m.blocks)
    assert m.pos_embed.requires_grad and m.pos_embed.shape == (1, 16 if dims == 2 else 32, 32)
    grid = (4, 4) if dims == 2 else (2, 4, 4)
    assert np.allclose(m.pos_embed[0].detach().numpy(), sincos_table(32, grid), atol=1e-6)
    assert m(x, torch.tensor(5.0)).shape == y.shape  # a scalar time broadcasts over the batch


def test_sincos_table_axes_and_order():
    t = sincos_table(12, (2, 3, 4))  # 3D: 4 channels per axis
    assert t.shape == (24, 12)
    # token (d, h, w) = (1, 2, 3) is row 1*12 + 2*4 + 3; its d-part equals 1D position 1
    row = t[1 * 12 + 2 * 4 + 3]
    assert np.allclose(row[:4], sincos_table(4, (2,))[1])
    assert np.allclose(row[8:12], sincos_table(4, (4,))[3])


def test_unpatchify_inverts_the_token_layout():
    """A token-wise identity check: patchify by conv weights that copy pixels, then unpatchify."""
    m = build_dit(3, (4, 4, 4), 1, 1, hidden_size=8, depth=1, num_heads=2, patch_size=2)
    x = torch.arange(64.0).reshape(1, 1, 4, 4, 4)
    from einops import rearrange

    tokens = rearrange(x, "b c (d pd) (h ph) (w pw) -> b (d h w) (pd ph pw c)", pd=2, ph=2, pw=2)
    assert torch.equal(m.unpatchify(tokens), x)


@pytest.mark.parametrize("dims, golden", [
    (2, (-7.148977, 24.588301, [-0.2912001, 0.1757199, 0.2370566, -0.0696404])),
    (3, (7.471907, 119.364098, [0.3784228, -0.3006217, -0.3633466, 0.7727092])),
])
def test_golden_values_fixed_seed(dims, golden):
    torch.manual_seed(0)
    m = _tiny(dims)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # non-zero weights everywhere, so every path contributes
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        size = (8, 8) if dims == 2 else (4, 8, 8)
        x = torch.randn((2, 2) + size, generator=g)
        y = m.eval()(x, torch.tensor([10.0, 700.0]))
    total, absolute, first = golden
    assert float(y.sum()) == pytest.approx(total, abs=2e-4)
    assert float(y.abs().sum()) == pytest.approx(absolute, rel=1e-5)
    assert y.flatten()[:4].tolist() == pytest.approx(first, abs=1e-5)


def test_dropout_and_drop_path_only_in_training():
    torch.manual_seed(0)
    m = _tiny(2, drop_rate=0.3, drop_path_rate=0.2)
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0.0, 0.2])  # linear 0 -> rate
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1.0, 2.0])
    m.eval()
    assert torch.equal(m(x, t), m(x, t))
    m.train()
    torch.manual_seed(1)
    a = m(x, t)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x, t))


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("dit", spatial_dims=2, input_size=(8, 8), in_channels=2, out_channels=1, patch_size=3)
    with pytest.raises(ConfigError, match="does not split"):
        build_model("dit", spatial_dims=3, input_size=(6, 8, 8), in_channels=2, out_channels=1, patch_size=4)
    from medgen_cli.config import load

    with pytest.raises(ConfigError) as e:
        load("2d-sit-s-128", ["model.patch_size=3", "data.image_size=130"])
    text = "\n".join(e.value.details)
    assert "model.patch_size" in text and "model.dit" not in text


DIT = ["--set", "model.kind=dit", "--set", "model.hidden_size=32", "--set", "model.depth=2",
       "--set", "model.num_heads=2", "--set", "model.patch_size=4", "--set", "model.drop_path_rate=0.1"]


@pytest.mark.parametrize("dims", [2, 3])
def test_tiny_dit_trains_through_medgen_train(cli, tiny_preset, phantom_root, tmp_path, dims):
    run = tmp_path / "run"
    r = cli("train", "--preset", tiny_preset(dims), "--data", phantom_root, "--run-dir", run,
            "--max-steps", 3, "--json", *DIT)
    assert r.code == 0, r.err
    preset = json.loads((run / "config.json").read_text())["preset"]
    assert preset["model"]["kind"] == "dit" and "channels" not in preset["model"]  # the UNet keys are dropped
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    if dims == 2:
        r = cli("sample", "--run", run, "--out", tmp_path / "s", "--n", 1, "--steps", 2, "--json")
        assert r.code == 0, r.err
