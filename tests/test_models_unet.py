"""UNet wrapper and model registry: parameter counts (SYSTEM.md §4), shapes, float time, checkpointing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

import medgen_cli.models.unet as unet_mod
from medgen_cli.errors import ConfigError
from medgen_cli.models import build_model, count_parameters
from medgen_cli.models.unet import build_unet

F, T = False, True
ROWS = {  # name: (kwargs, params in SYSTEM.md §4)
    "2d-default": (dict(spatial_dims=2, channels=[128, 256, 256], attention_levels=[F, T, T],
                        num_res_blocks=1, num_head_channels=256), 18.5e6),
    "2d-exp7": (dict(spatial_dims=2, channels=[128, 256, 256, 512], attention_levels=[F, F, T, T],
                     num_res_blocks=1, num_head_channels=256), 51.0e6),
    "2d-adm": (dict(spatial_dims=2, channels=[128, 128, 256, 384, 512], attention_levels=[F, F, T, T, T],
                    num_res_blocks=2, num_head_channels=64), 92.2e6),
    "2d-tiny": (dict(spatial_dims=2, channels=[32, 64, 128], attention_levels=[F, F, T],
                     num_res_blocks=1, num_head_channels=32), 2.7e6),
    "3d-default": (dict(spatial_dims=3, channels=[16, 32, 64, 256, 512, 512], attention_levels=[F, F, F, F, T, T],
                        num_res_blocks=[1, 1, 1, 2, 2, 2], num_head_channels=16, norm_num_groups=16), 269.6e6),
}
TINY = dict(channels=[8, 16], attention_levels=[F, T], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_parameter_counts_match_reference(name):
    kwargs, expected = ROWS[name]
    n = count_parameters("unet", in_channels=2, out_channels=1, **kwargs)
    assert abs(n - expected) / expected < 0.02, (name, n)


def test_count_parameters_allocates_nothing_for_a_billion_parameter_model():
    n = count_parameters("unet", spatial_dims=3, in_channels=16, out_channels=8,
                         channels=[64, 128, 512, 1024, 1024], attention_levels=[F, F, F, T, T],
                         num_res_blocks=[2, 2, 3, 3, 3], num_head_channels=32)
    assert abs(n - 1.424e9) / 1.424e9 < 0.02


def _tiny(dims: int, **kw):
    torch.manual_seed(0)
    net = build_model("unet", spatial_dims=dims, in_channels=2, out_channels=1, **TINY, **kw)
    with torch.no_grad():  # MONAI zero-inits the output and residual convs: perturb everything
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("dims, size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_forward_shape_and_float_time(dims, size):
    net = _tiny(dims).eval()
    x = torch.randn(2, 2, *size)  # (B, C_in, *spatial)
    with torch.no_grad():
        y = net(x, torch.tensor([10.0, 10.0]))
        y_frac = net(x, torch.tensor([10.5, 10.5]))
        y_scalar = net(x, torch.tensor(10.0))
    assert y.shape == (2, 1, *size)
    assert not torch.allclose(y, y_frac)  # fractional model times reach the embedding
    torch.testing.assert_close(y, y_scalar)


@pytest.mark.parametrize("dims, size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_forward_equals_monai_forward(dims, size):
    net = _tiny(dims).eval()
    x, t = torch.randn(2, 2, *size), torch.tensor([3.25, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), DiffusionModelUNet.forward(net, x, timesteps=t))


def test_state_dict_keys_are_monai_keys():
    kw = dict(spatial_dims=2, in_channels=2, out_channels=1, **TINY)
    ours = build_model("unet", **kw)
    theirs = DiffusionModelUNet(**{**kw, "channels": tuple(kw["channels"])})
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("dims, size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_gradient_checkpointing_same_gradients(dims, size, monkeypatch):
    calls = []
    real = unet_mod.checkpoint
    monkeypatch.setattr(unet_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t = torch.randn(2, 2, *size), torch.tensor([1.0, 500.0])
    grads = []
    for ckpt in (False, True):
        net = _tiny(dims, gradient_checkpointing=ckpt).train()
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert len(calls) == 2 * len(TINY["channels"]) + 1  # every down and up block, and the mid block
    calls.clear()
    with torch.no_grad():
        net.eval()(x, t)
    assert not calls  # never in evaluation


def test_unknown_kind_and_bad_knobs_are_config_errors():
    with pytest.raises(ConfigError) as err:
        build_model("unte", spatial_dims=2)
    assert "unet" in err.value.hint
    with pytest.raises(ConfigError):
        build_model("unet", spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 12],
                    attention_levels=[F, T], num_res_blocks=1, num_head_channels=8, norm_num_groups=8)


PKG = Path(__file__).resolve().parents[1] / "medgen_cli"


def _imported_names(path: Path):
    """(absolute-or-relative dotted name, level) for every import in ``path``, with imported members."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from ((f"{node.module or ''}.{a.name}".strip("."), node.level) for a in node.names)


@pytest.mark.parametrize("pkg", ["models", "diffusion", "solvers"])
def test_models_diffusion_solvers_do_not_import_each_other(pkg):
    banned = {"models", "diffusion", "solvers"} - {pkg}
    for path in (PKG / pkg).glob("*.py"):
        for name, level in _imported_names(path):
            parts = name.split(".")
            assert parts[0] not in {"typer", "rich"}, (path, name)
            reaches_sibling = level >= 2 or (level == 0 and parts[0] == "medgen_cli")
            assert not (reaches_sibling and banned & set(parts)), (path, name)


@pytest.mark.parametrize("dims", [2, 3])
def test_sdpa_attention_equals_materialised_attention(dims):
    """model.sdpa_attention (the default) only changes how attention is computed, not the model."""
    kw = dict(spatial_dims=dims, in_channels=2, out_channels=1, channels=[16, 32], attention_levels=[False, True],
              num_res_blocks=1, num_head_channels=16, norm_num_groups=8)
    torch.manual_seed(0)
    plain = build_unet(**kw)
    fast = build_unet(**kw, use_flash_attention=True)
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast.load_state_dict(plain.state_dict())
    x = torch.randn((2, 2) + (8,) * dims)
    t = torch.tensor([10.0, 500.0])
    assert torch.allclose(plain(x, t), fast(x, t), atol=1e-5)
