"""Sampling maths: solver orders, adaptive tolerances, the Gaussian closed form, Restart, NFE, CFG."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medgen_cli.diffusion import RectifiedFlow
from medgen_cli.engine.sampling import Guidance, Plan, Restart, restart_grid, sample_batch
from medgen_cli.errors import UsageError
from medgen_cli.solvers import ADAPTIVE, FIXED, get_solver, nfe, solve

ORDERS = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


def _error(name: str, steps: int, a: float = 1.3) -> float:
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = get_solver(name)(lambda x, t: a * x, torch.ones(1, dtype=torch.float64), ts)
    return abs(x.item() - math.exp(-a))


def test_registry_lists_every_solver():
    assert set(ORDERS) == set(FIXED) and set(ADAPTIVE) == {"fehlberg2", "bosh3", "dopri5", "dopri8"}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_fixed_step_orders(name):
    errs = [_error(name, n) for n in (8, 16, 32)]
    for coarse, fine in zip(errs, errs[1:]):
        assert math.log2(coarse / fine) == pytest.approx(ORDERS[name], abs=0.3), errs


def _adaptive(name, tol):
    calls = []
    f = lambda x, t: calls.append(1) or 1.3 * x  # noqa: E731
    x = solve(name, f, torch.ones(1, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64),
              atol=tol, rtol=tol)
    return abs(x.item() - math.exp(-1.3)), len(calls)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_meets_tolerance_and_counts(name):
    # The controllers bound the local error per step; the global error is a small multiple of the tolerance
    # (torchdiffeq's fehlberg2 advances with its order-1 solution, hence its larger multiple).
    err, calls = _adaptive(name, 1e-6)
    assert err < (100 if name == "fehlberg2" else 10) * 1e-6
    loose, loose_calls = _adaptive(name, 1e-2)
    assert err < loose and calls >= loose_calls >= 2


def test_tolerance_refused_for_fixed_steps():
    with pytest.raises(UsageError):
        solve("euler", lambda x, t: x, torch.ones(1), torch.linspace(1, 0, 3), atol=1e-3)


# ---- the exact rectified-flow field of Gaussian data -----------------------------------------------
MU, S = 0.3, 0.5


class GaussianVelocity(nn.Module):
    """E[x0 − ε | x_t] for x0 ~ N(MU, S²), ε ~ N(0, 1); counts its forward calls."""

    def __init__(self, T: int):
        super().__init__()
        self.T, self.calls = T, 0

    def forward(self, inp, mt):
        self.calls += 1
        x = inp[:, :1].double()
        t = (mt.double() / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * S**2 + t**2
        return (MU + ((1 - t) * S**2 - t) / var * (x - (1 - t) * MU)).float()


def _gauss(plan: Plan, b: int = 2, side: int = 96):
    rf = RectifiedFlow(num_train_timesteps=1000)
    net = GaussianVelocity(rf.T)
    noise = torch.randn((b, 1, side, side), generator=torch.Generator().manual_seed(0))
    out = sample_batch(net, rf, noise, torch.zeros(b, 0, side, side), plan, keys=[(5, i) for i in range(b)])
    return out, net


@pytest.mark.parametrize("solver, steps", [("euler", 100), ("midpoint", 20), ("heun2", 20), ("heun3", 10),
                                           ("rk4", 8), ("bosh3", 1), ("dopri5", 1), ("fehlberg2", 1),
                                           ("dopri8", 1)])
def test_gaussian_mean_and_variance_recovered(solver, steps):
    tol = {"atol": 1e-4, "rtol": 1e-4} if solver in ADAPTIVE else {}
    out, net = _gauss(Plan(solver=solver, steps=steps, **tol))
    x = out.x.double()
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    if solver in FIXED:  # one batched call per evaluation
        assert out.nfe == [nfe(solver, steps)] * 2 == [net.calls] * 2
    else:  # adaptive: each sample integrated (and counted) alone
        assert sum(out.nfe) == net.calls


def test_restart_keeps_the_distribution_and_counts():
    r = Restart(2, 20, 0.1, 0.3)  # enough Euler steps that discretisation error stays below 3 %
    out, net = _gauss(Plan(solver="euler", steps=100, restart=r))
    assert out.x.double().mean().item() == pytest.approx(MU, abs=0.015)
    assert out.x.double().std().item() == pytest.approx(S, rel=0.03)
    assert out.nfe == [100 + 2 * 20] * 2 and net.calls == 140


def test_restart_with_no_restarts_is_euler():
    a, _ = _gauss(Plan(solver="euler", steps=10, restart=Restart(0, 5, 0.1, 0.3)), side=16)
    b, _ = _gauss(Plan(solver="euler", steps=10), side=16)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == [10, 10]


def test_restart_snaps_t_min_to_the_grid_below_t_max():
    ts = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert restart_grid(ts, Restart(1, 3, 0.12, 0.3)) == (9, pytest.approx(0.1))
    assert restart_grid(ts, Restart(1, 3, 0.3, 0.3))[1] == pytest.approx(0.2)  # below t_max


def test_renoise_gives_the_marginal_at_t_max():
    rf = RectifiedFlow()
    g = torch.Generator().manual_seed(1)
    x0, eps, z = (torch.randn(200_000, generator=g) for _ in range(3))
    x = rf.renoise(0.6 * x0 + 0.4 * eps, 0.4, 0.7, z)  # x0 coefficient must become 0.3, noise sd 0.7
    resid = x - 0.3 * x0
    assert resid.std().item() == pytest.approx(0.7, rel=0.01)
    assert (resid * x0).mean().item() == pytest.approx(0.0, abs=0.01)


# ---- guidance ---------------------------------------------------------------------------------------
class CondNet(nn.Module):
    """Velocity = condition channel (so u = 0 and c = cond); records batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, inp, mt):
        self.batches.append(inp.shape[0])
        return inp[:, 1:2] * 1.0


def test_cfg_static_and_dynamic():
    rf = RectifiedFlow()
    noise, cond = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    net = CondNet()
    out = sample_batch(net, rf, noise, cond, Plan(steps=4, guidance=Guidance(3.0)))
    # x(0) = x(1) + ∫ v dt over [0, 1] with v = w·c, c = 1
    torch.testing.assert_close(out.x, torch.full_like(out.x, 3.0))
    assert out.cfg_batched and out.nfe == [4, 4] and net.batches == [4] * 4  # the pair in one call
    out = sample_batch(CondNet(), rf, noise, cond, Plan(steps=1000, guidance=Guidance(3.0, 1.0)))
    torch.testing.assert_close(out.x, torch.full_like(out.x, 2.0), atol=2e-3, rtol=0)  # ∫(1 + 2t) dt = 2
    out = sample_batch(CondNet(), rf, noise, cond, Plan(steps=4, guidance=Guidance(1.0)))
    assert not out.cfg_batched


def test_batch_size_does_not_change_a_sample():
    from medgen_cli.models.registry import build_model

    torch.manual_seed(0)
    net = build_model("unet", spatial_dims=2, in_channels=2, out_channels=1, channels=[8, 16],
                      attention_levels=[False, True], num_res_blocks=1, num_head_channels=8, norm_num_groups=8).eval()
    rf = RectifiedFlow()
    g = torch.Generator().manual_seed(3)
    noise, cond = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    keys = [(9, i) for i in range(2)]
    # (adaptive solvers integrate each sample alone, so they are batch independent by construction)
    for plan in (Plan(steps=3, restart=Restart(1, 2, 0.2, 0.5), guidance=Guidance(2.0, 1.0)),):
        whole = sample_batch(net, rf, noise, cond, plan, keys=keys)
        for i in range(2):
            one = sample_batch(net, rf, noise[i:i + 1], cond[i:i + 1], plan, keys=keys[i:i + 1])
            torch.testing.assert_close(one.x[0], whole.x[i], atol=1e-5, rtol=0)
            assert one.nfe[0] == whole.nfe[i]


def test_bf16_state_keeps_fp64_time():
    rf = RectifiedFlow()
    out = sample_batch(CondNet(), rf, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), Plan(steps=7),
                       state_dtype=torch.bfloat16)
    torch.testing.assert_close(out.x, torch.ones_like(out.x), atol=1e-2, rtol=0)


def test_shifted_and_uniform_grids():
    rf = RectifiedFlow(shift=3.0)
    assert torch.allclose(rf.time_grid(4, 1.0), torch.linspace(1, 0, 5, dtype=torch.float64))
    g = rf.time_grid(4)
    assert g[0] == 1 and g[-1] == 0 and g[2] == pytest.approx(0.75)  # 3·0.5/(1 + 2·0.5)
