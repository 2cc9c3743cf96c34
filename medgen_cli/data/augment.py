"""2D slice augmentation for diffusion training (SYSTEM.md §1, "conservative" set).

One transform = a horizontal flip (p 0.5) and an integer-pixel translation of up to ±20 % of the
width (x, the last array axis) and ±10 % of the height (y), zero-filled. The same transform is applied
to every channel of an item (image(s) and mask), so the mask stays aligned with its image.

Two ways to draw it, both keyed (no global RNG, so resume, data-parallel ranks and worker processes
see the same transforms):

- ``static``: one transform per slice, drawn from (seed, slice index) when the slice list is built and
  kept for the whole run. This is what the reference ran ("aug on", SYSTEM.md §12 item 13).
- ``dynamic``: a new transform per (seed, epoch, slice index): the intended mechanism.

Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLIP_P = 0.5
SHIFT_X = 0.20  # fraction of the width (last axis)
SHIFT_Y = 0.10  # fraction of the height
STREAM_STATIC = 0x41554753  # keyed draws: (seed, STREAM_STATIC, index)
STREAM_DYNAMIC = 0x41554744  # keyed draws: (seed, STREAM_DYNAMIC, epoch, index)
KINDS = ("none", "static", "dynamic")


@dataclass(frozen=True)
class SliceTransform:
    flip: bool  # mirror the last axis
    dy: int  # rows moved down (negative: up)
    dx: int  # columns moved right (negative: left)

    @property
    def identity(self) -> bool:
        return not self.flip and self.dy == 0 and self.dx == 0


IDENTITY = SliceTransform(False, 0, 0)


def draw(keys: tuple[int, ...], height: int, width: int) -> SliceTransform:
    """The transform keyed by ``keys`` for an (H, W) slice."""
    from ..runtime import keyed_seed

    rng = np.random.default_rng(keyed_seed(*keys))
    flip = bool(rng.random() < FLIP_P)
    mx, my = int(SHIFT_X * width), int(SHIFT_Y * height)
    dx = int(rng.integers(-mx, mx + 1))
    dy = int(rng.integers(-my, my + 1))
    return SliceTransform(flip, dy, dx)


def _shift(a: np.ndarray, d: int, axis: int) -> np.ndarray:
    """Move ``a`` by ``d`` along ``axis`` with zero fill (no wrap-around)."""
    if d == 0:
        return a
    out = np.zeros_like(a)
    n = a.shape[axis]
    if abs(d) >= n:
        return out
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis], dst[axis] = (slice(0, n - d), slice(d, n)) if d > 0 else (slice(-d, n), slice(0, n + d))
    out[tuple(dst)] = a[tuple(src)]
    return out


def apply(arr: np.ndarray, tr: SliceTransform) -> np.ndarray:
    """``arr`` (C, H, W) → the transformed copy (C, H, W)."""
    if tr.identity:
        return arr
    out = arr[..., ::-1] if tr.flip else arr
    out = _shift(_shift(out, tr.dy, -2), tr.dx, -1)
    return np.ascontiguousarray(out)


class SliceAugmenter:
    """Transform of slice ``index``: static ones are drawn for all slices at construction."""

    def __init__(self, kind: str, seed: int, n: int, height: int, width: int):
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation '{kind}' (choose {', '.join(KINDS)})")
        self.kind, self.seed, self.hw = kind, int(seed), (int(height), int(width))
        self.epoch = 0
        self.static = [draw((self.seed, STREAM_STATIC, i), *self.hw) for i in range(n)] if kind == "static" else None

    def transform(self, index: int) -> SliceTransform:
        if self.kind == "static":
            return self.static[index]
        if self.kind == "dynamic":
            return draw((self.seed, STREAM_DYNAMIC, self.epoch, index), *self.hw)
        return IDENTITY
