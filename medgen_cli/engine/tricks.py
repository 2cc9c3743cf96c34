"""Training tricks of the reference (SYSTEM.md §5), each small and stateless or with saved state.

Randomness here is keyed like the rest of training (the caller passes keyed draws), so resume
and data parallelism are unaffected. State that must survive a resume (spike statistics, the
plateau schedule) is a plain dict saved in trainer_state.json.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime import to_device


def snr(strategy, t: torch.Tensor, unsquared: bool = False) -> torch.Tensor:
    """Signal-to-noise ratio at normalised time t (B,): rflow ((1-t)/t)^2, DDPM abar/(1-abar)."""
    if getattr(strategy, "alpha_bar", None) is not None:
        a = strategy.alpha_bar(t)
        return a / (1 - a).clamp_min(1e-12)
    r = (1 - t) / t.clamp_min(1e-6)
    return r if unsquared else r**2


def min_snr_weight(strategy, t: torch.Tensor, gamma: float, unsquared: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weight min(SNR, gamma) / SNR per sample (B,) (Hang et al. 2023)."""
    s = snr(strategy, t, unsquared)
    return torch.minimum(s, torch.full_like(s, gamma)) / s.clamp_min(1e-12)


def augment_noise(noise: torch.Tensor, extra: torch.Tensor, std: float) -> torch.Tensor:
    """noise + std * extra, rescaled so the result keeps unit variance."""
    return (noise + std * extra) / math.sqrt(1 + std**2)


def curriculum_max(epoch: int, epochs: int, start_max: float) -> float:
    """Upper end of the uniform t range at `epoch`: start_max -> 1 linearly over `epochs`."""
    return start_max + (1 - start_max) * min(epoch / epochs, 1.0)


def snap_rflow(strategy, t: torch.Tensor) -> torch.Tensor:
    """Back onto the training grid k/T, k in {1..T}, for discrete-time rectified flow."""
    if strategy.continuous:
        return t.clamp(1e-6, 1.0)
    return torch.ceil(t * strategy.T).clamp(1, strategy.T) / strategy.T


@torch.no_grad()
def add_grad_noise(params, sigma: float, step: int, generator: torch.Generator) -> None:
    """Gradient noise N(0, sigma_t^2), sigma_t = sigma / (1 + step)^0.55 (Neelakantan et al. 2015)."""
    s = sigma / (1 + step) ** 0.55
    for p in params:
        if p.grad is not None:
            z = torch.randn(p.grad.shape, generator=generator, dtype=torch.float32)
            p.grad.add_(to_device(z, p.grad.device, p.grad.dtype), alpha=s)


class SpikeGuard:
    """Skip optimizer steps whose pre-clip gradient norm is > factor x the running mean.

    The running mean is updated on every step with min(norm, factor x mean), so a spike moves it
    by at most (1 - decay) x factor and a lasting change of scale is still learned — unlike the
    reference's early detector, which froze its mean after a skip and then skipped forever.
    """

    def __init__(self, factor: float, decay: float, warmup: int):
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.state = {"mean": None, "seen": 0, "skipped": 0}

    def skip(self, norm: float) -> bool:
        st = self.state
        mean = st["mean"]
        spike = mean is not None and st["seen"] >= self.warmup and norm > self.factor * mean
        capped = norm if mean is None else min(norm, self.factor * mean)
        st["mean"] = capped if mean is None else self.decay * mean + (1 - self.decay) * capped
        st["seen"] += 1
        st["skipped"] += int(spike)
        return spike


class Plateau:
    """ReduceLROnPlateau on the validation loss: scale x factor after `patience` flat validations."""

    def __init__(self, factor: float, patience: int):
        self.factor, self.patience = factor, patience
        self.state = {"best": None, "bad": 0, "scale": 1.0}

    def observe(self, val_loss: float) -> None:
        st = self.state
        if st["best"] is None or val_loss < st["best"]:
            st["best"], st["bad"] = val_loss, 0
            return
        st["bad"] += 1
        if st["bad"] > self.patience:
            st["scale"], st["bad"] = st["scale"] * self.factor, 0


def middle_block(model: nn.Module) -> nn.Module:
    mid = getattr(model, "middle_block", None)
    if mid is None:
        raise ValueError("feature perturbation needs a network with a middle block (the UNet)")
    return mid


class FeaturePerturbation:
    """A forward hook adding N(0, std^2) to the middle block's output while training.

    The noise comes from a generator the trainer re-keys every step (draws stay reproducible).
    """

    def __init__(self, model: nn.Module, std: float):
        self.std, self.generator = std, torch.Generator()
        self.handle = middle_block(model).register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if not module.training:
            return out
        z = torch.randn(out.shape, generator=self.generator, dtype=torch.float32)
        return out + self.std * to_device(z, out.device, out.dtype)


@torch.no_grad()
def sam_perturb(model: nn.Module, rho: float, adaptive: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move the weights to the (A)SAM ascent point w + e; returns what to subtract afterwards."""
    params = [p for p in model.parameters() if p.grad is not None]
    scaled = [(p.abs() if adaptive else 1.0) * p.grad for p in params]
    norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2).clamp_min(1e-12)
    moves = []
    for p, s in zip(params, scaled):
        e = (p.abs() if adaptive else 1.0) * s * (rho / norm)
        p.add_(e)
        moves.append((p, e))
    return moves


@torch.no_grad()
def sam_restore(moves) -> None:
    for p, e in moves:
        p.sub_(e)


# --- scoreaug/sda, regional weighting, bf16 loss -----------------------------------------
RANO_WEIGHT_KEYS = ("tiny", "small", "medium", "large")


def regional_weight_map(mask: torch.Tensor, weights: dict, fov_mm: float = 240.0) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, *spatial) from tumour sizes in ``mask`` (B, 1, *spatial) (> 0.5).

    Each face-connected component gets the weight of its RANO-BM class (tiny < 10, small 10–20,
    medium 20–30, large ≥ 30 mm, exact Feret diameter, data/sizebins.py); background gets
    ``weights["background"]``. Pixel size is the reference's: a ``fov_mm`` field of view in-plane
    (240 / size mm) and 1 mm between slices."""
    import numpy as np

    from ..data.sizebins import label_components, rano_class, tumour_diameters

    m = (mask[:, 0] > 0.5).cpu().numpy()
    spatial = m.shape[1:]
    spacing = tuple([1.0] * (len(spatial) - 2) + [fov_mm / spatial[-2], fov_mm / spatial[-1]])
    out = np.full(m.shape, float(weights["background"]), dtype=np.float32)
    for b in range(m.shape[0]):
        if not m[b].any():
            continue
        labels, n = label_components(m[b])
        lut = np.array([weights["background"]] + [weights[rano_class(d)] for d in tumour_diameters(m[b], spacing)],
                       dtype=np.float32)
        out[b] = lut[labels]
    return to_device(torch.from_numpy(out)[:, None], mask.device)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 pixel_weight: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """Mean of pixel_weight · (pred − target)² per sample, times ``weight`` (B,), averaged; fp32, or
    computed in bfloat16 when ``bf16`` (``compat.bf16_loss``: the reference's pre-Jan-7 BF16 MSE)."""
    dt = torch.bfloat16 if bf16 else torch.float32
    err = (pred.to(dt) - target.to(dt)).square()
    if pixel_weight is not None:
        err = err * pixel_weight.to(dt)
    err = err.flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        err = err * weight.to(err)
    return err.mean().float()


class LossExtras:
    """The diffusion loss with ScoreAug, SDA, regional weighting and/or the bf16 MSE (trainer `_loss`)."""

    def __init__(self, cfg, compat: dict, mode: str, dims: int | None, n_vector: int, omega: bool):
        from .scoreaug import ScoreAug

        self.cfg, self.compat, self.mode, self.n_vector, self.omega = cfg, compat, mode, int(n_vector), omega
        self.dims = dims
        self.scoreaug = None
        if cfg.scoreaug is not None:
            self.scoreaug = ScoreAug(cfg.scoreaug, dims or 2, cfg.seed, bool(compat.get("scoreaug_identity_flag")))
        self.regional = cfg.regional_weighting.model_dump() if cfg.regional_weighting is not None else None

    @classmethod
    def from_config(cls, cfg, config_json: str, model) -> "LossExtras | None":
        """None unless an option needs it. compat, mode and dims come from the resolved preset JSON."""
        import json

        try:
            preset = json.loads(config_json or "{}")
        except ValueError:
            preset = {}
        compat = preset.get("compat", {}) or {}
        data = preset.get("data", {}) or {}
        if not (cfg.scoreaug or cfg.sda or cfg.regional_weighting or compat.get("bf16_loss")):
            return None
        return cls(cfg, compat, data.get("mode", "bravo"), data.get("dims"), getattr(model, "n_vector", 0),
                   hasattr(model, "omega_embed"))

    def _pixel_weight(self, image, cond):
        if self.regional is None:
            return None
        source = image[:, :1] if self.mode.startswith("seg") else cond[:, :1]
        return regional_weight_map(source, self.regional, self.regional["fov_mm"])

    def loss(self, net, strategy, image, cond, t, noise, weight, step: int) -> torch.Tensor:
        bf16 = bool(self.compat.get("bf16_loss"))
        pw = self._pixel_weight(image, cond)
        x_t = strategy.noisy(image, noise, t)
        target = strategy.target(image, noise, t)  # the target first, then ω (ScoreAug)
        inp = torch.cat([x_t, cond], dim=1)
        kwargs = {}
        if self.scoreaug is not None:
            sa = self.scoreaug
            if sa.dims != image.ndim - 2:  # no dims in the preset JSON (direct Trainer use): from the batch
                from .scoreaug import ScoreAug

                sa = self.scoreaug = ScoreAug(sa.cfg, image.ndim - 2, sa.seed, sa.identity_flag)
            op = sa.draw(step)
            inp, target = sa.augment(op, inp, target, image.shape[1], self.n_vector)
            if pw is not None:
                pw = op.apply(pw - 1.0, intensity=False) + 1.0  # moved with the image; cut regions weigh 1
            if self.omega:
                kwargs["omega"] = sa.omega(op, image.shape[0], image.device)
        pred = net(inp, strategy.model_time(t), **kwargs)
        loss = weighted_mse(pred, target, weight, pw, bf16)
        sda_cfg = self.cfg.sda
        if sda_cfg is not None:
            from . import sda

            op = sda.draw(self.cfg.seed, step, sda_cfg.prob, image.ndim - 2)
            if op is not None:
                p2, t2 = sda.branch(net, strategy, image, cond, t, noise, op, sda_cfg.noise_shift,
                                    bool(self.compat.get("sda_shift_clamp_bug")),
                                    bool(self.compat.get("sda_untransformed_condition")))
                pw2 = None
                if pw is not None:  # the weights move with the transformed image (SDA excludes ScoreAug)
                    from .scoreaug import apply_spatial

                    pw2 = apply_spatial(pw, *op)
                loss = loss + sda_cfg.weight * weighted_mse(p2, t2, weight, pw2, bf16)
        return loss
