"""ScoreAug (Hou et al. 2025): augment the noisy input and the target together (SYSTEM.md §5).

Order: the strategy's target is computed from the clean image first; then ONE transform ω is drawn
per batch (keyed by (seed, step), so resume and data-parallel ranks draw the same ω) and applied
identically to the whole model input — noisy image AND condition maps — and to the target. Trailing
vector channels (multi's modality id, seg_conditioned's size bins: constant maps read as a vector)
are left alone, since a translation or cutout would change their value. Brightness scales the image
channels (noisy input and target) only, never a mask.

Transforms (tensors (B, C, H, W) or (B, C, D, H, W); H, W are the last two axes):
- spatial: 2D the D4 group (rot90 k = 1..3, hflip, vflip, rot90·k then hflip for k = 1, 3);
  3D rotations about the D axis (k = 1..3) and flips of W, H, D;
- translation, zero padded: 2D uniform in ±40 % of W (x) and ±20 % of H (y); 3D one of 0, ±20 %, ±40 %
  per axis (D, H, W);
- cutout: one rectangle of 10–30 % of each in-plane side, zeroed (3D: the same rectangle on every slice);
- one of 16 fixed patterns (``pattern_mask``; 3D: the same 2D mask on every slice);
- brightness: a factor s = B^u, u uniform in [-1, 1], i.e. s in [1/B, B].

Modes: ``single`` (v1) picks uniformly among identity and the enabled transforms (spatial, translation,
cutout, and brightness when B is set); ``compose`` applies spatial, translation, cutout (and brightness)
each with ``compose_prob``, in that order; ``v2`` applies spatial and translation each with p 0.5, then
one destructive transform with p 0.5 — cutout or a uniformly chosen pattern, 50/50 (and brightness with
p 0.5 when B is set).

Omega encoding (36-d, ``Op.encode``): 0–3 active flags (spatial, translation, cutout, pattern); 4–9
spatial type one-hot (2D rot90, rot180, rot270, hflip, vflip, rot·hflip; 3D rot90, rot180, rot270,
flip W, flip H, flip D); 10 k/3; 11–13 translation as fractions of the size ((x, y, 0) in 2D, (d, h, w)
in 3D); 14–15 cutout size (h, w fractions); 16–31 pattern one-hot; 32–35 the modality one-hot under mode
intensity scaling (``mode_intensity``, multi mode: the network wrapper scales the noisy image by the
modality's factor and fills these dims, models/conditioning.py ``OmegaConditioned``), otherwise dim 32
carries the log brightness factor (SYSTEM.md lists no brightness dimension; the two options exclude each
other) and 33–35 stay 0. Identity, and
generation, encode to all zeros — distinct from every transform. ``compat.scoreaug_identity_flag``
reproduces the reference at the document date: identity/generation = dim 0 set to 1, which collides
with the "spatial active" flag (the "augmentation leakage" of 3D exp23).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..runtime import keyed_generator, to_device

OMEGA_DIM = 36
N_PATTERNS = 16
STREAM_SCOREAUG = 0x53434F52  # keyed draws: (seed, STREAM_SCOREAUG, step)

# Fraction of the in-plane area each fixed pattern zeroes (exact when H and W divide by 8).
PATTERN_FRACTIONS = (0.5, 0.5, 0.5, 0.5,  # checkerboards 4x4 / 4x4 offset / 8x8 / 8x8 offset
                     0.25, 0.25, 0.5, 0.5,  # grid dropout: 4x4 cells, 25 % / 50 %, two fixed seeds each
                     2 / 16, 3 / 16, 4 / 16, 4 / 16,  # coarse dropout: 2, 3, 4, 4 holes of a quarter side
                     0.25, 0.25, 0.5, 0.5)  # MAE-style patch dropout: 8x8 patches, 25 % / 50 %, two seeds each


def _edges(n_px: int, cells: int) -> list[int]:
    return [round(i * n_px / cells) for i in range(cells + 1)]


def _cells_mask(h: int, w: int, cells: int, dropped) -> torch.Tensor:
    """(H, W) keep-mask (1 keep, 0 drop) of a cells x cells grid with the cells in ``dropped`` zeroed."""
    m = torch.ones(h, w)
    eh, ew = _edges(h, cells), _edges(w, cells)
    for c in dropped:
        i, j = divmod(int(c), cells)
        m[eh[i]:eh[i + 1], ew[j]:ew[j + 1]] = 0
    return m


def _fixed_choice(pid: int, cells: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(7919 + pid)  # fixed per pattern, independent of the run's seed
    return torch.randperm(cells * cells, generator=g)[:n].tolist()


def pattern_mask(pid: int, h: int, w: int) -> torch.Tensor:
    """Keep-mask (H, W) float32 of fixed pattern ``pid`` (0–15); see PATTERN_FRACTIONS."""
    if not 0 <= pid < N_PATTERNS:
        raise ValueError(f"pattern id must be 0..15, got {pid}")
    if pid < 4:  # checkerboards
        cells, offset = (4, 8)[pid // 2], pid % 2
        return _cells_mask(h, w, cells, [c for c in range(cells * cells) if (sum(divmod(c, cells)) + offset) % 2])
    if pid < 8:  # grid dropout 4x4
        return _cells_mask(h, w, 4, _fixed_choice(pid, 4, 16 * (1 if pid < 6 else 2) // 4))
    if pid < 12:  # coarse dropout: large holes (a quarter of each side)
        return _cells_mask(h, w, 4, _fixed_choice(pid, 4, (2, 3, 4, 4)[pid - 8]))
    return _cells_mask(h, w, 8, _fixed_choice(pid, 8, 64 * (1 if pid < 14 else 2) // 4))  # MAE patches


SPATIAL_2D = (("rot", 1), ("rot", 2), ("rot", 3), ("hflip", 0), ("vflip", 0), ("rot_hflip", 1), ("rot_hflip", 3))
SPATIAL_3D = (("rot", 1), ("rot", 2), ("rot", 3), ("hflip", 0), ("vflip", 0), ("dflip", 0))


def spatial_choices(dims: int, rotation: bool, flip: bool) -> tuple:
    table = SPATIAL_2D if dims == 2 else SPATIAL_3D
    out = tuple(e for e in table if (rotation and e[0] == "rot") or (flip and e[0] in ("hflip", "vflip", "dflip"))
                or (rotation and flip and e[0] == "rot_hflip"))
    return out


def apply_spatial(x: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    if kind == "rot":
        return torch.rot90(x, k, dims=(-2, -1))
    if kind == "hflip":
        return x.flip(-1)
    if kind == "vflip":
        return x.flip(-2)
    if kind == "dflip":
        return x.flip(-3)
    if kind == "rot_hflip":
        return torch.rot90(x, k, dims=(-2, -1)).flip(-1)
    raise ValueError(f"unknown spatial transform {kind!r}")


def shift_zero(x: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """Shift the trailing len(offsets) axes by integer ``offsets`` (positive = towards higher index), zero fill."""
    out = torch.zeros_like(x)
    src, dst = [slice(None)] * x.ndim, [slice(None)] * x.ndim
    n = len(offsets)
    for a, o in enumerate(offsets):
        ax, size = x.ndim - n + a, x.shape[x.ndim - n + a]
        if abs(o) >= size:
            return out
        src[ax] = slice(max(0, -o), size - max(0, o))
        dst[ax] = slice(max(0, o), size - max(0, -o))
    out[tuple(dst)] = x[tuple(src)]
    return out


@dataclass
class Op:
    """One drawn ScoreAug transform ω (any part may be absent); applied in field order."""

    dims: int
    spatial: tuple[str, int] | None = None
    shift: tuple[float, ...] | None = None  # fractions per axis: 2D (y, x); 3D (d, h, w)
    cutout: tuple[float, float, float, float] | None = None  # (fh, fw, fy0, fx0): size and corner fractions
    pattern: int | None = None
    brightness: float | None = None

    @property
    def identity(self) -> bool:
        return all(v is None for v in (self.spatial, self.shift, self.cutout, self.pattern, self.brightness))

    def _pixels(self, x: torch.Tensor) -> tuple[int, ...]:
        sizes = x.shape[-len(self.shift):]
        return tuple(round(f * s) for f, s in zip(self.shift, sizes))

    def apply(self, x: torch.Tensor, intensity: bool = True) -> torch.Tensor:
        """ω(x); ``intensity`` False skips brightness (condition maps, masks, weight maps)."""
        if self.spatial is not None:
            x = apply_spatial(x, *self.spatial)
        if self.shift is not None:
            x = shift_zero(x, self._pixels(x))
        if self.cutout is not None:
            fh, fw, fy, fx = self.cutout
            h, w = x.shape[-2:]
            ch, cw = max(1, round(fh * h)), max(1, round(fw * w))
            y0, x0 = min(round(fy * h), h - ch), min(round(fx * w), w - cw)
            x = x.clone()
            x[..., y0:y0 + ch, x0:x0 + cw] = 0
        if self.pattern is not None:
            x = x * to_device(pattern_mask(self.pattern, *x.shape[-2:]), x.device, x.dtype)
        if self.brightness is not None and intensity:
            x = x * self.brightness
        return x

    def encode(self, identity_flag: bool = False) -> torch.Tensor:
        """The 36-d omega vector (module docstring)."""
        v = torch.zeros(OMEGA_DIM)
        if self.identity:
            if identity_flag:
                v[0] = 1.0
            return v
        if self.spatial is not None:
            table = SPATIAL_2D[:5] + (("rot_hflip", -1),) if self.dims == 2 else SPATIAL_3D
            kind, k = self.spatial
            slot = [i for i, (n, kk) in enumerate(table) if n == kind and (kk == k or kind != "rot")][0]
            v[0], v[4 + slot], v[10] = 1.0, 1.0, k / 3
        if self.shift is not None:
            v[1] = 1.0
            fr = (self.shift[1], self.shift[0], 0.0) if self.dims == 2 else self.shift  # 2D: (x, y, 0)
            v[11:14] = torch.tensor(fr, dtype=torch.float32)
        if self.cutout is not None:
            v[2], v[14], v[15] = 1.0, self.cutout[0], self.cutout[1]
        if self.pattern is not None:
            v[3], v[16 + self.pattern] = 1.0, 1.0
        if self.brightness is not None:
            v[32] = math.log(self.brightness)
        return v


class ScoreAug:
    """Draws ω per (seed, step) from a ``ScoreAugConfig`` and applies it to (input, target)."""

    def __init__(self, cfg, dims: int, seed: int, identity_flag: bool = False):
        self.cfg, self.dims, self.seed, self.identity_flag = cfg, int(dims), int(seed), bool(identity_flag)
        self.spatial = spatial_choices(self.dims, cfg.rotation, cfg.flip)

    # -- drawing ---------------------------------------------------------------------------------
    def _draw_spatial(self, g):
        return self.spatial[int(torch.randint(len(self.spatial), (), generator=g))]

    def _draw_shift(self, g) -> tuple[float, ...]:
        if self.dims == 2:
            u = torch.rand(2, generator=g) * 2 - 1
            return (0.2 * float(u[0]), 0.4 * float(u[1]))  # (y, x)
        steps = (-0.4, -0.2, 0.0, 0.2, 0.4)
        return tuple(steps[int(i)] for i in torch.randint(5, (3,), generator=g))

    def _draw_cutout(self, g) -> tuple[float, float, float, float]:
        u = torch.rand(4, generator=g)
        fh, fw = 0.1 + 0.2 * float(u[0]), 0.1 + 0.2 * float(u[1])
        return (fh, fw, float(u[2]) * (1 - fh), float(u[3]) * (1 - fw))

    def _draw_brightness(self, g) -> float:
        return float(self.cfg.brightness ** (2 * float(torch.rand((), generator=g)) - 1))

    def draw(self, step: int) -> Op:
        cfg, g = self.cfg, keyed_generator(self.seed, STREAM_SCOREAUG, int(step))
        op = Op(self.dims)
        coin = lambda p: float(torch.rand((), generator=g)) < p  # noqa: E731
        if cfg.mode == "single":
            kinds = ["identity"] + [k for k, on in (("spatial", bool(self.spatial)), ("shift", cfg.translation),
                                                   ("cutout", cfg.cutout), ("brightness", cfg.brightness)) if on]
            pick = kinds[int(torch.randint(len(kinds), (), generator=g))]
            if pick == "spatial":
                op.spatial = self._draw_spatial(g)
            elif pick == "shift":
                op.shift = self._draw_shift(g)
            elif pick == "cutout":
                op.cutout = self._draw_cutout(g)
            elif pick == "brightness":
                op.brightness = self._draw_brightness(g)
            return op
        p = cfg.compose_prob if cfg.mode == "compose" else 0.5
        if self.spatial and coin(p):
            op.spatial = self._draw_spatial(g)
        if cfg.translation and coin(p):
            op.shift = self._draw_shift(g)
        if cfg.mode == "compose":
            if cfg.cutout and coin(p):
                op.cutout = self._draw_cutout(g)
        elif coin(0.5):  # v2: one destructive transform
            if cfg.cutout and coin(0.5):
                op.cutout = self._draw_cutout(g)
            else:
                op.pattern = int(torch.randint(N_PATTERNS, (), generator=g))
        if cfg.brightness and coin(p):
            op.brightness = self._draw_brightness(g)
        return op

    # -- applying --------------------------------------------------------------------------------
    def augment(self, op: Op, inp: torch.Tensor, target: torch.Tensor, n_image: int, n_vector: int = 0):
        """(ω(input), ω(target)): image channels with brightness, condition maps without, vector channels
        untouched. ``inp`` (B, n_image + C_cond, …), ``target`` (B, n_image, …)."""
        if op.identity:
            return inp, target
        c = inp.shape[1]
        maps_end = c - n_vector
        parts = [op.apply(inp[:, :n_image])]
        if maps_end > n_image:
            parts.append(op.apply(inp[:, n_image:maps_end], intensity=False))
        if n_vector:
            parts.append(inp[:, maps_end:])
        return torch.cat(parts, dim=1), op.apply(target)

    def omega(self, op: Op, batch: int, device) -> torch.Tensor:
        return to_device(op.encode(self.identity_flag), device).expand(batch, -1)
