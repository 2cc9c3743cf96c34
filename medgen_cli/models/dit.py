"""DiT / SiT: a plain transformer on patch tokens, 2D or 3D from one code path (SYSTEM.md §4).

"SiT" is this same network trained with rectified flow; the name only tells the strategy apart.

Why medgen writes its own: MONAI 1.6 has no DiT (its transformer blocks are ViT/UNETR encoders
without timestep modulation), and the public DiT/SiT code is 2D-only, class-conditional and keeps a
frozen position table. medgen needs, in one module: ``spatial_dims`` 2 or 3, concat conditioning
through the patch embedder, a learnable position table initialised from 2D/3D sin-cos, QK-norm,
dropout and stochastic depth, and the ``forward(x, t)`` signature every medgen model shares.

Shapes: B batch, C channels, N = ∏(size_i / p) tokens, E hidden width, H heads, P = p^dims · C_out.
Spatial axes are named ``d h w`` (3D) or ``h w`` (2D); einops patterns are built from those names.

Block (adaLN-Zero, Peebles & Xie 2023): the timestep embedding e gives six vectors
(shift, scale, gate) for attention and for the MLP; the modulation and the final projection start at
zero, so every block is the identity and the output is 0 at initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

# variant → (hidden width, depth, heads); MLP ratio 4 for all.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCH_SIZES = (1, 2, 4, 8, 16)
FREQ_DIM = 256  # sinusoidal features of the timestep before its MLP


def _axes(dims: int) -> list[str]:
    return ["d", "h", "w"][-dims:]


# ---- position table --------------------------------------------------------------------------
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, dim): sin on the first half, cos on the second."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    angles = np.einsum("m,k->mk", pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_table(dim: int, grid: Sequence[int]) -> np.ndarray:
    """(∏grid, dim) table: each spatial axis gets an equal share of the (even) channels; the rest 0.

    Token order is row-major over ``grid`` (the order ``rearrange('b e d h w -> b (d h w) e')`` gives).
    """
    share = (dim // len(grid)) // 2 * 2  # even channels per axis
    coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    parts = [_sincos_1d(share, c) for c in coords]  # each (N, share)
    table = np.concatenate(parts, axis=1)  # (N, dims·share)
    return np.pad(table, ((0, 0), (0, dim - table.shape[1])))  # (N, dim)


# ---- pieces ----------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Float model time (B,) → sinusoidal features (B, dim) (cos first, as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, E) · (1 + scale) + shift, with shift/scale (B, E)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)  # (B, 1, 1)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``, optional QK-norm."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, drop: float = 0.0):
        super().__init__()
        self.heads, self.drop = heads, float(drop)
        self.qkv = nn.Linear(dim, 3 * dim)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (k h e) -> k b h n e", k=3, h=self.heads)  # (3, B, H, N, E/H)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.drop if self.training else 0.0)
        out = rearrange(out, "b h n e -> b n (h e)")  # (B, N, E)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(drop),
                         nn.Linear(hidden, dim), nn.Dropout(drop))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation from the timestep embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm, drop)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, N, E), e (B, E) → (B, N, E)."""
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(e).chunk(6, dim=-1)  # each (B, E)
        x = x + self.drop_path(g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1)))
        return x + self.drop_path(g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_per_token: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_per_token)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(e).chunk(2, dim=-1)  # (B, E) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, P)


# ---- the network -----------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion transformer on ``spatial_dims``-D inputs of fixed ``input_size``; forward(x, t) → y.

    ``in_channels`` counts the noisy image plus any concatenated condition channels (they all enter
    the patch embedder); ``out_channels`` is the image's.
    """

    def __init__(self, spatial_dims: int, input_size: Sequence[int], in_channels: int, out_channels: int,
                 patch_size: int = 2, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qk_norm: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, gradient_checkpointing: bool = False):
        super().__init__()
        dims, p = int(spatial_dims), int(patch_size)
        if dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")
        if p not in PATCH_SIZES:
            raise ValueError(f"patch_size must be one of {PATCH_SIZES}, got {p}")
        if len(input_size) != dims or any(s % p for s in input_size):
            raise ValueError(f"input size {tuple(input_size)} does not split into {dims}D patches of {p}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.dims, self.p, self.out_channels = dims, p, int(out_channels)
        self.grid = tuple(int(s) // p for s in input_size)  # tokens per axis
        self.gradient_checkpointing = bool(gradient_checkpointing)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.patch_embed = conv(in_channels, hidden_size, kernel_size=p, stride=p)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), hidden_size))  # (1, N, E), learnable
        self.t_embed = nn.Sequential(nn.Linear(FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        rates = [float(drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]  # 0 → drop_path_rate
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, drop_rate, r) for r in rates)
        self.final = FinalLayer(hidden_size, p**dims * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        table = sincos_table(self.pos_embed.shape[-1], self.grid)  # (N, E)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(table).float()[None])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: modulation and gates start at 0
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for lin in (self.final.ada[-1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _run(self, block: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, e, use_reentrant=False)
        return block(x, e)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, *spatial), t (B,) float model time → (B, C_out, *spatial)."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        axes = " ".join(_axes(self.dims))  # "h w" or "d h w"
        h = self.patch_embed(x)  # (B, E, *grid)
        h = rearrange(h, f"b e {axes} -> b ({axes}) e") + self.pos_embed.to(h.dtype)  # (B, N, E)
        e = self.t_embed(timestep_features(t).to(h.dtype))  # (B, E)
        for block in self.blocks:
            h = self._run(block, h, e)  # (B, N, E)
        h = self.final(h, e)  # (B, N, p^dims·C_out)
        return self.unpatchify(h)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, p^dims·C) tokens → (B, C, *spatial)."""
        names = _axes(self.dims)
        sizes = dict(zip(names, self.grid))
        patch = {f"p{a}": self.p for a in names}
        src = f"b ({' '.join(names)}) ({' '.join(patch)} c)"
        dst = "b c " + " ".join(f"({a} p{a})" for a in names)
        return rearrange(h, f"{src} -> {dst}", **sizes, **patch)


def build_dit(spatial_dims: int, input_size: Sequence[int], in_channels: int, out_channels: int,
              variant: str = "S", patch_size: int = 2, hidden_size: int | None = None, depth: int | None = None,
              num_heads: int | None = None, mlp_ratio: float = 4.0, qk_norm: bool = True, drop_rate: float = 0.0,
              drop_path_rate: float = 0.0, gradient_checkpointing: bool = False) -> DiT:
    """A DiT of a named ``variant`` (S/B/L/XL); ``hidden_size``/``depth``/``num_heads`` override it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant '{variant}' (choose {', '.join(VARIANTS)})")
    e, d, h = VARIANTS[variant]
    return DiT(spatial_dims, input_size, in_channels, out_channels, patch_size=patch_size,
               hidden_size=hidden_size or e, depth=depth or d, num_heads=num_heads or h, mlp_ratio=mlp_ratio,
               qk_norm=qk_norm, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
               gradient_checkpointing=gradient_checkpointing)
