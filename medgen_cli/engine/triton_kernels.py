"""The Triton kernels behind ``engine/triton_conv.py`` (its docstring says what they compute and why).

Plain Triton, imported only when a kernel is first needed. Tensors are channels-last: element
``(n, c, d, h, w)`` of a ``C``-channel tensor sits at ``(((n·D + d)·H + h)·W + w)·C + c``.
"""

import triton
import triton.language as tl


@triton.jit
def _folded_rows(x_ptr, plane, h, w, t, D, H, W, CIN: tl.constexpr, K: tl.constexpr):
    """[M, K] for the output positions (plane = n·D + d, h, w) and tap t = kd·3 + kh: input row h + kh − 1
    of plane d + kd − 1 at positions w − 1, w, w + 1, channels innermost; zero outside the volume and in
    the K padding. (Rows of tile positions past the output's edge are read but never used: the forward
    does not store them, the weight gradient multiplies them by a masked-out zero gradient.)"""
    j = tl.arange(0, K)
    dd = plane % D + t // 3 - 1
    hh = h + t % 3 - 1
    w_in = w[:, None] - 1 + j[None, :] // CIN
    ok = (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H)
    col_ok = (j[None, :] < 3 * CIN) & (w_in >= 0) & (w_in < W)
    base = ((plane + t // 3 - 1) * H + hh) * W * CIN  # ((n·D + dd)·H + hh)·W·C_in
    return tl.load(x_ptr + base[:, None] + (w[:, None] - 1) * CIN + j[None, :], mask=col_ok & ok[:, None],
                   other=0.0)


@triton.jit
def forward(x_ptr, w_ptr, b_ptr, y_ptr, D, H, W, CIN: tl.constexpr, COUT: tl.constexpr, K: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """y (C_out padded to COUT) = the 3×3×3 convolution of x (CIN channels) for one tile of one plane; grid
    (N·D, tiles along H, tiles along W); w_ptr: the folded weights (9, K, COUT), b_ptr: the bias (COUT)."""
    plane = tl.program_id(0).to(tl.int64)
    m = tl.arange(0, BLOCK_H * BLOCK_W)
    h = tl.program_id(1) * BLOCK_H + m // BLOCK_W
    w = tl.program_id(2) * BLOCK_W + m % BLOCK_W
    j = tl.arange(0, K)
    o = tl.arange(0, COUT)
    acc = tl.full((BLOCK_H * BLOCK_W, COUT), 0.0, tl.float32)
    for t in tl.static_range(9):
        a = _folded_rows(x_ptr, plane, h, w, t, D, H, W, CIN, K)
        acc += tl.dot(a, tl.load(w_ptr + t * K * COUT + j[:, None] * COUT + o[None, :]))
    acc += tl.load(b_ptr + o).to(tl.float32)[None, :]
    out = y_ptr + ((plane * H + h) * W + w)[:, None] * COUT + o[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=((h < H) & (w < W))[:, None])


@triton.jit
def weight_grad(x_ptr, g_ptr, out_ptr, D, H, W, tiles_h, tiles_w, tiles, CIN: tl.constexpr,
                CG: tl.constexpr, COUT: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_W: tl.constexpr):
    """out (9, K, COUT) += Σ over this program's tiles of A_tapᵀ @ g, for the tap program_id(1); grid
    (programs, 9), program i taking tiles i, i + programs, …; g has CG ≤ COUT channels."""
    t = tl.program_id(1)
    m = tl.arange(0, BLOCK_H * BLOCK_W)
    j = tl.arange(0, K)
    o = tl.arange(0, COUT)
    acc = tl.full((K, COUT), 0.0, tl.float32)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        plane = (tile // (tiles_h * tiles_w)).to(tl.int64)
        rest = tile % (tiles_h * tiles_w)
        h = (rest // tiles_w) * BLOCK_H + m // BLOCK_W
        w = (rest % tiles_w) * BLOCK_W + m % BLOCK_W
        a = _folded_rows(x_ptr, plane, h, w, t, D, H, W, CIN, K)
        gy = tl.load(g_ptr + ((plane * H + h) * W + w)[:, None] * CG + o[None, :],
                     mask=((h < H) & (w < W))[:, None] & (o[None, :] < CG), other=0.0)  # [M, C_out]
        acc += tl.dot(tl.trans(a), gy)
    tl.atomic_add(out_ptr + t * K * COUT + j[:, None] * COUT + o[None, :], acc)
