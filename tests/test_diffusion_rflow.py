"""Rectified flow: MONAI's time direction and velocity sign, time sampling, grids, loss."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from medgen_cli.diffusion import RectifiedFlow, build_strategy, shift_time
from medgen_cli.errors import ConfigError, UsageError
from medgen_cli.solvers import euler

SHAPES = [(3, 2, 5, 6), (3, 1, 4, 5, 6)]  # toy 2D and 3D batches


@pytest.fixture(params=SHAPES, ids=["2d", "3d"])
def x0_noise(request):
    g = torch.Generator().manual_seed(0)
    return torch.randn(request.param, generator=g), torch.randn(request.param, generator=g)


def test_noisy_endpoints_and_x0_recovery(x0_noise):
    x0, eps = x0_noise
    rf = RectifiedFlow()
    zeros, ones = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(rf.noisy(x0, eps, zeros), x0)  # t = 0 is clean
    torch.testing.assert_close(rf.noisy(x0, eps, ones), eps)  # t = 1 is noise
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = rf.noisy(x0, eps, t)
    v = rf.target(x0, eps, t)
    torch.testing.assert_close(v, x0 - eps)  # velocity points from noise to data
    torch.testing.assert_close(rf.x0_from(x_t, v, t), x0)
    torch.testing.assert_close(rf.drift(v, x_t, t), eps - x0)  # dx/dt = −v


def test_sample_prediction_converts_to_the_same_velocity(x0_noise):
    x0, eps = x0_noise
    rf = RectifiedFlow(prediction="sample")
    t = torch.tensor([0.2, 0.5, 1.0])
    x_t = rf.noisy(x0, eps, t)
    torch.testing.assert_close(rf.target(x0, eps, t), x0)
    torch.testing.assert_close(rf.x0_from(x_t, x0, t), x0)
    torch.testing.assert_close(rf.velocity(x0, x_t, t), x0 - eps, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(rf.velocity(x0, x0, torch.zeros(3))).all()  # t → 0 is clamped


def test_noisy_matches_monai_add_noise(x0_noise):
    x0, eps = x0_noise
    t = torch.tensor([0.05, 0.5, 0.95])
    ours = RectifiedFlow().noisy(x0, eps, t)
    theirs = RFlowScheduler(1000, use_discrete_timesteps=False).add_noise(x0, eps, t * 1000)
    torch.testing.assert_close(ours, theirs)


def test_euler_sampling_matches_monai_step_loop():
    T, N = 1000, 10  # grid points 1000, 900, … are exact in MONAI's float16 cast
    rf = RectifiedFlow(T)
    net = lambda x, mt: torch.sin(x + mt.reshape(-1, 1, 1, 1) / T)  # noqa: E731  any smooth field
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = rf.sample(net, x, N, euler)
    sched = RFlowScheduler(T, use_discrete_timesteps=False)
    sched.set_timesteps(N)
    ts = [float(t) for t in sched.timesteps] + [0.0]
    y = x
    for t, t_next in zip(ts[:-1], ts[1:]):
        y, _ = sched.step(net(y, torch.full((2,), t)), t, y, t_next)
    torch.testing.assert_close(ours, y)


def test_time_grid_float64_decreasing_and_shifted_like_monai():
    rf = RectifiedFlow(1000, shift=0.5)
    grid = rf.time_grid(25)
    assert grid.dtype == torch.float64 and grid.shape == (26,)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid.diff() < 0).all()
    torch.testing.assert_close(RectifiedFlow().time_grid(4), torch.linspace(1, 0, 5, dtype=torch.float64))
    sched = RFlowScheduler(1000, use_discrete_timesteps=False, use_timestep_transform=True,
                           base_img_size_numel=4 * 64 * 64, spatial_dim=2)  # r = (1/4)^(1/2) = 0.5
    sched.set_timesteps(25, input_img_size_numel=64 * 64)
    torch.testing.assert_close(grid[:-1] * 1000, sched.timesteps.double(), atol=0.5, rtol=0)  # fp16 quirk
    with pytest.raises(UsageError):
        rf.time_grid(0)


def test_times_from_uniform_logit_normal_uniform_shift_discrete():
    u = torch.tensor([1e-9, 0.1, 0.5, 0.9, 1.0])
    t = RectifiedFlow().times_from_uniform(u)
    normal = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(t[1:4], torch.sigmoid(normal.icdf(u[1:4])))
    assert ((t > 0) & (t < 1)).all() and t[2] == 0.5
    torch.testing.assert_close(RectifiedFlow(t_sampling="uniform").times_from_uniform(u[1:4]), u[1:4])
    shifted = RectifiedFlow(t_sampling="uniform", shift=2.0).times_from_uniform(torch.tensor([0.5]))
    torch.testing.assert_close(shifted, torch.tensor([2 / 3]))
    torch.testing.assert_close(shift_time(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))


def test_discrete_times_cover_one_to_T_uniformly():
    rf = RectifiedFlow(100, continuous=False, t_sampling="uniform")
    u = (torch.arange(10_000) + 0.5) / 10_000
    k = rf.model_time(rf.times_from_uniform(u))
    assert k.min() == 1 and k.max() == 100 and torch.equal(k, k.round())
    assert torch.bincount(k.long(), minlength=101)[1:].unique().tolist() == [100]
    assert RectifiedFlow(100).model_time(torch.tensor([0.123])).item() == pytest.approx(12.3)


def test_loss_is_fp32_and_weighted():
    pred = torch.ones(2, 1, 3, 3, dtype=torch.bfloat16)
    target = torch.zeros(2, 1, 3, 3, dtype=torch.bfloat16)
    rf = RectifiedFlow()
    loss = rf.loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == 1.0
    assert rf.loss(pred, target, weight=torch.tensor([0.0, 3.0])).item() == 1.5


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError) as err:
        RectifiedFlow(t_sampling="logit_normal")
    assert "logit-normal" in err.value.hint
    with pytest.raises(ConfigError):
        RectifiedFlow(prediction="epsilon")
    with pytest.raises(ConfigError) as err:
        build_strategy("rflw")
    assert "rflow" in err.value.hint
    assert isinstance(build_strategy("rflow", num_train_timesteps=100), RectifiedFlow)
