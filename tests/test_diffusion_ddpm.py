"""DDPM: MONAI's schedules, integer-time convention, x₀ recovery, DDIM against MONAI and a point mass."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medgen_cli.diffusion import DDPM, build_strategy
from medgen_cli.errors import UsageError


@pytest.mark.parametrize("schedule", ["cosine", "linear_beta"])
@pytest.mark.parametrize("T", [1000, 100])
def test_alphas_cumprod_equal_monai(schedule, T):
    ours = DDPM(T, schedule=schedule).alphas_cumprod
    theirs = DDPMScheduler(T, schedule=schedule).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-6)


def test_times_are_integer_steps_zero_to_T_minus_one():
    d = DDPM(100)
    u = (torch.arange(1000) + 0.5) / 1000
    k = d.model_time(d.times_from_uniform(u))
    assert k.min() == 0 and k.max() == 99 and torch.equal(k, k.round())
    assert torch.bincount(k.long()).unique().tolist() == [10]


@pytest.mark.parametrize("shape", [(3, 2, 5, 6), (3, 1, 4, 5, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_noisy_matches_monai_and_x0_is_recovered(shape, prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    d = DDPM(1000, prediction=prediction)
    t = torch.tensor([0, 500, 999]) / 1000
    x_t = d.noisy(x0, eps, t)
    theirs = DDPMScheduler(1000, schedule="cosine").add_noise(x0, eps, torch.tensor([0, 500, 999]))
    torch.testing.assert_close(x_t, theirs)
    target = d.target(x0, eps, t)
    torch.testing.assert_close(target, eps if prediction == "epsilon" else x0)
    torch.testing.assert_close(d.x0_from(x_t[:2], target[:2], t[:2]), x0[:2], rtol=1e-4, atol=1e-4)


def test_clip_sample_clamps_x0():
    x_t, pred, t = torch.full((1, 1, 2, 2), 5.0), torch.zeros(1, 1, 2, 2), torch.tensor([0.5])
    assert DDPM(clip_sample=True).x0_from(x_t, pred, t).max() == 1.0
    assert DDPM().x0_from(x_t, pred, t).max() > 5.0


def _point_mass_net(d: DDPM, point: torch.Tensor):
    """The exact network for data that is always ``point``."""
    def net(x, mt):
        a = d.alphas_cumprod[mt.long()].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        if d.prediction == "sample":
            return point.expand_as(x)
        return (x - a.sqrt() * point) / (1 - a).sqrt()
    return net


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_exact_model_returns_the_point(prediction, steps):
    d = DDPM(1000, prediction=prediction)
    point = torch.tensor([0.3, -0.7], dtype=torch.float64).reshape(1, 2, 1, 1)
    x_T = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []
    out = d.ddim_sample(_point_mass_net(d, point), x_T, steps, callback=lambda i, t, x: seen.append(t))
    torch.testing.assert_close(out, point.expand_as(out), rtol=1e-9, atol=1e-9)  # fp64: exact
    assert len(seen) == steps and seen[-1] == 0.0


def test_ddim_matches_monai_when_steps_equal_T():
    T = 100  # with N = T MONAI's prev-step rule and its grid agree, so the trajectories must too
    d = DDPM(T, schedule="linear_beta")
    net = lambda x, mt: torch.tanh(x) * (1 + mt.reshape(-1, 1, 1, 1) / T)  # noqa: E731
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    ours = d.ddim_sample(net, x, T)
    sched = DDIMScheduler(T, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(T)
    assert sched.timesteps.tolist() == d.ddim_steps(T)
    y = x
    for k in sched.timesteps:
        y, _ = sched.step(net(y, torch.full((2,), float(k))), int(k), y)
    torch.testing.assert_close(ours, y, rtol=1e-4, atol=1e-4)


def test_ddim_grid_is_monai_grid_and_steps_are_checked():
    d = DDPM(1000)
    sched = DDIMScheduler(1000)
    sched.set_timesteps(50)
    assert d.ddim_steps(50) == sched.timesteps.tolist()
    assert DDPM(1000, ddim_spacing="leading").ddim_steps(50) == list(range(980, -1, -20))
    with pytest.raises(UsageError):
        d.ddim_steps(1001)
    with pytest.raises(UsageError):
        d.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), 10, solver=object())
    assert isinstance(build_strategy("ddpm", schedule="linear_beta"), DDPM)
