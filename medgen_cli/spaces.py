"""Spaces between the data and the model: pixel, space-to-depth, Haar wavelet (SYSTEM.md §4).

A space turns a batch of images ``x`` (B, C, *spatial) in [0, 1] into what the network models and back:

    pixel    identity                                   (B, C, *spatial)
    s2d      lossless space-to-depth, factor 2 per axis (B, 2^dims·C, *spatial/2)
    wavelet  one-level orthonormal Haar DWT             (B, 2^dims·C, *spatial/2), sub-bands LLL … HHH

Channels are ordered (c, k): input channel c's 2^dims polyphase parts / sub-bands are neighbours.
Sub-band k's bits, most significant first, say low (0) or high (1) along d, h, w; k = 0 is LLL.
The Haar transform is the s2d rearrangement followed by the orthonormal 2^dims × 2^dims matrix
H⊗H(⊗H), H = [[1, 1], [1, −1]]/√2, so both spaces are exactly invertible (up to float rounding).

Options: ``rescale`` maps [0, 1] → [−1, 1] before the transform; ``normalize`` (wavelet) standardises
each sub-band with a mean/std estimated from at most 200 training items (`estimate_stats`); the numbers
are stored in the preset's ``[space] stats``, so they travel in config.json and every checkpoint.
Condition channels (masks) take the transform only: they are not rescaled or normalised.

Resolution shift: the reference computed the timestep-transform ratio from the pixel size, which makes
r = (numel(space)/numel(pixel))^(1/dims) = 1/2 here (SYSTEM.md §2, §12.9, unintended). medgen uses
r = 1 unless ``compat.pixel_base_shift`` asks for the reference's value (`Space.reference_shift`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from einops import rearrange

from .runtime import to_device

KINDS = ("pixel", "s2d", "wavelet")
MAX_STATS_ITEMS = 200


def _axes(dims: int) -> list[str]:
    return ["d", "h", "w"][-dims:]


def space_to_depth(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(B, C, *spatial) → (B, C·2^dims, *spatial/2); 3D: PixelUnshuffle3D with factor 2."""
    a = _axes(dims)
    src = "b c " + " ".join(f"({n} r{n})" for n in a)
    dst = f"b (c {' '.join('r' + n for n in a)}) {' '.join(a)}"
    return rearrange(x, f"{src} -> {dst}", **{f"r{n}": 2 for n in a})


def depth_to_space(z: torch.Tensor, dims: int) -> torch.Tensor:
    """Inverse of `space_to_depth`."""
    a = _axes(dims)
    src = f"b (c {' '.join('r' + n for n in a)}) {' '.join(a)}"
    dst = "b c " + " ".join(f"({n} r{n})" for n in a)
    return rearrange(z, f"{src} -> {dst}", **{f"r{n}": 2 for n in a})


def haar_matrix(dims: int) -> torch.Tensor:
    """(2^dims, 2^dims) orthonormal Haar analysis matrix; row k = sub-band k, column = polyphase part."""
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    m = h
    for _ in range(dims - 1):
        m = torch.kron(m, h)
    return m


def _mix(z: torch.Tensor, m: torch.Tensor, dims: int) -> torch.Tensor:
    """Apply m (K, K) to the K = 2^dims parts of each channel of z (B, C·K, *s)."""
    k = 2**dims
    zz = rearrange(z, "b (c k) ... -> b c k ...", k=k)  # (B, C, K, *s)
    out = torch.einsum("jk,bck...->bcj...", m.to(z.dtype), zz)  # (B, C, K, *s)
    return rearrange(out, "b c k ... -> b (c k) ...")


def dwt(x: torch.Tensor, dims: int) -> torch.Tensor:
    """One-level orthonormal Haar DWT: (B, C, *spatial) → (B, C·2^dims, *spatial/2)."""
    return _mix(space_to_depth(x, dims), to_device(haar_matrix(dims), x.device), dims)


def idwt(z: torch.Tensor, dims: int) -> torch.Tensor:
    """Inverse Haar DWT (the matrix is orthogonal: its inverse is its transpose)."""
    return depth_to_space(_mix(z, to_device(haar_matrix(dims).t(), z.device), dims), dims)


def subband_names(dims: int) -> list[str]:
    """['LLL', 'LLH', …, 'HHH'] (3D) or ['LL', …, 'HH'] (2D), in channel order."""
    return ["".join(bits) for bits in itertools.product("LH", repeat=dims)]


class Space:
    """A pixel-space transform with its options; `encode`/`decode` images, `encode_cond` conditions."""

    def __init__(self, kind: str = "pixel", dims: int = 2, rescale: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown space '{kind}'")
        self.kind, self.dims, self.rescale = kind, int(dims), bool(rescale)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)

    @property
    def factor(self) -> int:
        """Down-sampling per spatial axis."""
        return 1 if self.kind == "pixel" else 2

    @property
    def reference_shift(self) -> float:
        """The reference's timestep-transform ratio r = (numel(space)/numel(pixel))^(1/dims) = 1/factor."""
        return 1.0 / self.factor

    def channels(self, c: int) -> int:
        return c * self.factor**self.dims

    def shape(self, pixel_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, *spatial) in pixels → (C', *spatial') in this space."""
        c, *spatial = pixel_shape
        return (self.channels(c), *(s // self.factor for s in spatial))

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "s2d":
            return space_to_depth(x, self.dims)
        if self.kind == "wavelet":
            return dwt(x, self.dims)
        return x

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "s2d":
            return depth_to_space(z, self.dims)
        if self.kind == "wavelet":
            return idwt(z, self.dims)
        return z

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * self.dims
        m, s = to_device(self.mean, z.device, z.dtype), to_device(self.std, z.device, z.dtype)
        if m.numel() != z.shape[1]:
            raise ValueError(f"space statistics have {m.numel()} channels, the data {z.shape[1]}")
        return m.view(shape), s.view(shape)

    def encode(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, C, *spatial) in [0, 1] → model space (B, C', *spatial')."""
        if self.rescale:
            x = x * 2.0 - 1.0
        z = self._transform(x)
        if normalize and self.mean is not None:
            m, s = self._stats(z)
            z = (z - m) / s
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model space → images (B, C, *spatial) on the [0, 1] scale (not clamped)."""
        if self.mean is not None:
            m, s = self._stats(z)
            z = z * s + m
        x = self._inverse(z)
        return (x + 1.0) * 0.5 if self.rescale else x

    def encode_cond(self, c: torch.Tensor) -> torch.Tensor:
        """Condition channels (B, C_cond, *spatial) → (B, C_cond·2^dims, …): transform only."""
        return self._transform(c)

    def encode_pair(self, image: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "pixel" and not self.rescale:
            return image, cond
        return self.encode(image), self.encode_cond(cond)


@torch.no_grad()
def estimate_stats(space: Space, dataset, max_items: int = MAX_STATS_ITEMS) -> tuple[list[float], list[float], int]:
    """Per-channel (sub-band) mean and std of ``space.encode(image)`` over ≤ max_items items, spread
    evenly over the dataset (deterministic). Returns (mean, std, items used)."""
    n = len(dataset)
    k = min(n, int(max_items))
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if n else []
    total = sq = None
    count = 0
    for i in picks:
        z = space.encode(dataset[i]["image"][None].float(), normalize=False).double()  # (1, C', *s)
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # (C', voxels)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        sq = (flat**2).sum(1) if sq is None else sq + (flat**2).sum(1)
        count += flat.shape[1]
    if not count:
        raise ValueError("no training items to estimate the space statistics from")
    mean = total / count
    std = (sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist(), len(picks)
