"""Generation: a trained network, a strategy and a solver turn noise into samples.

This is where diffusion strategies and solvers meet (they do not import each other). The network
call is wrapped in a counter, so the reported NFE is exactly the number of network evaluations.

NFE and classifier-free guidance. ``nfe`` is the number of forward calls of the network that a
sample took part in, counted at the network. With guidance the conditional and unconditional
inputs are concatenated along the batch and evaluated in **one** call (``cfg_batched``), so a guided
step costs one NFE of a doubled batch; ``model_evals`` = 2·nfe then counts the two branches apart.

Batch independence. Fixed-step solvers, DDIM and Restart treat every sample alone (per-sample
GroupNorm, per-sample keyed draws), so a sample does not depend on the batch it is in. Adaptive
solvers choose one step size for the whole tensor they integrate, so they integrate each sample
separately (and report its own NFE).

Self-conditioning (``train.self_conditioning = "x0"``; models/selfcond.py). ``CountingNet`` keeps the
x̂0 of each evaluation (per row: rflow x_t + t·v̂, DDPM from ε or x₀, at the network's time
model_time/T) and passes it to the next evaluation as ``x0_prev`` (zeros at the first evaluation of a
``sample_batch`` call). So every solver — fixed-step (including intermediate stages), adaptive (every
stage torchdiffeq evaluates, accepted or not), Restart (across its re-noisings) and DDIM — feeds the
previous evaluation's estimate. With guidance the batched pair keeps one estimate per branch (the
conditional rows their own, the unconditional rows theirs). The state is per row, so samples stay
independent of the batch they are in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

STREAM_RESTART = 0x52455354  # keyed draws of Restart's re-noising: (seed, STREAM_RESTART, index, restart)


@dataclass
class CountingNet:
    """Calls `net(cat[x, cond], model_time)` and counts evaluations (one per batched call). With
    ``strategy`` set (a self-conditioned network) each call passes the previous call's x̂0 (module docstring)."""

    net: nn.Module
    cond: torch.Tensor  # (B, C_cond, ...) possibly with 0 channels
    nfe: int = 0
    strategy: object = None  # self-conditioning: turns each prediction into the next call's x̂0
    sc_channels: int = 0  # self-conditioning: x̂0 channels of the network
    x0_prev: torch.Tensor | None = None  # (rows, C_img, ...) the last evaluation's x̂0

    def __call__(self, x: torch.Tensor, model_t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.nfe += 1
        c = self.cond if cond is None else cond
        inp = torch.cat([x.float(), c.to(x.device, torch.float32)], dim=1)  # (B, C_img + C_cond, ...)
        if self.strategy is None:
            return self.net(inp, model_t)
        prev = self.x0_prev
        if prev is None or prev.shape[0] != x.shape[0]:  # first evaluation: zeros (one call signature)
            prev = inp.new_zeros((x.shape[0], self.sc_channels, *x.shape[2:]))
        out = self.net(inp, model_t, x0_prev=prev)
        t = model_t.float().reshape(-1).expand(x.shape[0]) / self.strategy.T
        self.x0_prev = self.strategy.x0_from(x.float(), out.float(), t).detach()
        return out


@dataclass
class Guidance:
    """Classifier-free guidance pred = u + w·(c − u); w goes linearly from ``scale`` at t = 1 (noise) to
    ``scale_end`` at t = 0 (dynamic CFG) or stays ``scale`` (static, ``scale_end`` None)."""

    scale: float = 1.0
    scale_end: float | None = None

    def weight(self, t):
        """w at normalised time ``t`` (a float, or a tensor: then a tensor, computed where it lives)."""
        if self.scale_end is None:
            return self.scale
        return self.scale_end + (self.scale - self.scale_end) * t

    @property
    def active(self) -> bool:
        return self.scale != 1.0 or (self.scale_end is not None and self.scale_end != 1.0)


class GuidedNet:
    """``net(x, model_time)`` with CFG: one call on [x; x] with [cond; null_cond] (the batched pair)."""

    def __init__(self, counted: CountingNet, guidance: Guidance, null_cond: torch.Tensor, T: int):
        self.counted, self.g, self.null, self.T = counted, guidance, null_cond, T

    @property
    def nfe(self) -> int:
        return self.counted.nfe

    def __call__(self, x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cond = torch.cat([self.counted.cond, self.null], dim=0)  # (2B, C_cond, ...)
        out = self.counted(torch.cat([x, x], dim=0), torch.cat([model_t, model_t], dim=0), cond)
        c, u = out[:b].float(), out[b:].float()
        w = self.g.weight(model_t.float().reshape(-1)[:1] / self.T)  # (1,) on the device, or a float: no host sync
        if isinstance(w, torch.Tensor):
            w = w.reshape(1, *[1] * (c.ndim - 1))
        return (u + w * (c - u)).to(out.dtype)


@dataclass
class Restart:
    """Restart sampling (Xu et al. 2023): K re-noisings to t_max, each followed by n Euler steps back."""

    k: int
    n: int
    t_min: float
    t_max: float


@dataclass
class Plan:
    """How to integrate: solver, steps, tolerances, time-grid shift, guidance, restart."""

    solver: str = "euler"
    steps: int = 25
    atol: float | None = None
    rtol: float | None = None
    shift: float | None = None  # None: the training schedule's shift; 1.0: uniform grid
    guidance: Guidance | None = None
    restart: Restart | None = None


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, ...) float32, x0 estimates
    nfe: list[int] = field(default_factory=list)  # per sample, counted at the network
    cfg_batched: bool = False


def batch_time(t, batch: int, device) -> torch.Tensor:
    """``t`` (a float or a one-element tensor) as a float32 (B,) tensor on ``device``. A host time becomes a
    fill on the device: copying it from pageable memory would wait for all queued GPU work each step."""
    if isinstance(t, torch.Tensor) and t.device != torch.device("cpu"):
        return t.to(device=device, dtype=torch.float32).reshape(1).expand(batch)
    return torch.full((batch,), float(t), dtype=torch.float32, device=device)  # (B,)


def _drift(strategy, net, b: int):
    def drift(x, t):
        tb = batch_time(t, b, x.device)
        pred = net(x, strategy.model_time(tb))
        return strategy.drift(pred.float(), x.float(), tb).to(x.dtype)

    return drift


def restart_grid(ts: torch.Tensor, r: Restart) -> tuple[int, float]:
    """Index and time of the main-grid point that Restart snaps t_min to: the grid time nearest to
    t_min among those below t_max (SYSTEM.md §9)."""
    below = [(abs(float(t) - r.t_min), i) for i, t in enumerate(ts.tolist()) if float(t) < r.t_max]
    _, i = min(below)
    return i, float(ts[i])


def _restart(strategy, net, x, ts, r: Restart, keys, callback=None):
    """Euler main pass with K restarts at t_min; ``keys[i]`` = (seed, index) keys sample i's draws."""
    from ..runtime import keyed_generator
    from ..solvers import euler

    b = x.shape[0]
    f = _drift(strategy, net, b)
    i_min, t_min = restart_grid(ts, r)
    x = euler(f, x, ts[: i_min + 1], callback=callback)
    for j in range(r.k):
        z = torch.stack([torch.randn(tuple(x.shape[1:]), generator=keyed_generator(s, STREAM_RESTART, i, j))
                         for s, i in keys]).to(x.device)  # (B, C, ...)
        x = strategy.renoise(x, t_min, r.t_max, z)
        x = euler(f, x, torch.linspace(r.t_max, t_min, r.n + 1, dtype=torch.float64))
    return euler(f, x, ts[i_min:])


def _integrate(strategy, net, x, plan: Plan, keys):
    from ..solvers import solve

    if getattr(strategy, "kind", "") == "ddpm":
        return strategy.ddim_sample(net, x, plan.steps)
    ts = strategy.time_grid(plan.steps, plan.shift)
    if plan.restart is not None:
        return _restart(strategy, net, x, ts, plan.restart, keys)
    return solve(plan.solver, _drift(strategy, net, x.shape[0]), x, ts, atol=plan.atol, rtol=plan.rtol)


@torch.no_grad()
def sample_batch(net: nn.Module, strategy, noise: torch.Tensor, cond: torch.Tensor, plan: Plan,
                 keys: list[tuple[int, int]] | None = None, autocast=None,
                 state_dtype: torch.dtype | None = None, space=None) -> Batch:
    """Integrate ``noise`` (t = 1) to data (t = 0) under ``plan``; ``keys`` (seed, index) per sample key
    Restart's draws. ``state_dtype`` (e.g. bf16) sets the solver state; times stay float64."""
    from ..solvers import ADAPTIVE

    keys = keys or [(0, i) for i in range(noise.shape[0])]
    if space is not None:  # spaces.py: the condition goes into the model's space (noise already is)
        cond = space.encode_cond(cond)
    x0 = noise.to(state_dtype) if state_dtype is not None else noise
    groups = [[i] for i in range(len(keys))] if plan.solver in ADAPTIVE else [list(range(len(keys)))]
    g = plan.guidance if plan.guidance is not None and plan.guidance.active else None
    outs, nfes = [], []
    from ..models.selfcond import channels

    n_sc = channels(net)  # self-conditioning: each call feeds the next its x̂0
    with autocast or contextlib.nullcontext():
        for idx in groups:
            counted = CountingNet(net, cond[idx], strategy=strategy if n_sc else None, sc_channels=n_sc)
            net_fn = counted if g is None else GuidedNet(counted, g, torch.zeros_like(cond[idx]), strategy.T)
            outs.append(_integrate(strategy, net_fn, x0[idx], plan, [keys[i] for i in idx]))
            nfes += [counted.nfe] * len(idx)
    x = torch.cat(outs).float()
    return Batch(x if space is None else space.decode(x), nfes, g is not None)  # decoded to pixels


@torch.no_grad()
def generate(net: nn.Module, strategy, noise: torch.Tensor, cond: torch.Tensor, solver: str = "euler",
             steps: int = 25, autocast=None, space=None) -> tuple[torch.Tensor, int]:
    """Integrate from pure noise (t=1) to data (t=0); returns (x0 estimate, NFE of the batch)."""
    if getattr(strategy, "kind", "") == "ddpm":
        solver = "ddim"
    out = sample_batch(net, strategy, noise, cond, Plan(solver=solver, steps=steps), autocast=autocast, space=space)
    return out.x, max(out.nfe)
