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
    the K padding. (Positions past the output's edge are read but never used: the forward does not store
    them, the weight gradient multiplies them by a masked-out zero gradient.)"""
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
            ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """y (C_out padded to COUT) = the 3×3×3 convolution of x (CIN channels) over ``ROWS`` output rows of a
    ``BLOCK_W``-wide strip of one plane; w_ptr: the folded weights (9, K, COUT), b_ptr: the bias (COUT).
    Each input row is read once per kd (3 row loads per output row, not 9): input row r adds to output
    rows r − 1, r and r + 1 (taps kh = 2, 1, 0), held in three accumulators that roll down by one row per
    step; row r − 1 is complete after step r and is stored. Grid (N·D, cdiv(H, ROWS), cdiv(W, BLOCK_W));
    the loop over rows is a real loop, so Triton can pipeline its loads."""
    plane = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * ROWS
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    o = tl.arange(0, COUT)
    wo = w_ptr + tl.arange(0, K)[:, None] * COUT + o[None, :]
    k0, k1, k2 = tl.load(wo), tl.load(wo + K * COUT), tl.load(wo + 2 * K * COUT)  # tap kd·3 + kh
    k3, k4, k5 = tl.load(wo + 3 * K * COUT), tl.load(wo + 4 * K * COUT), tl.load(wo + 5 * K * COUT)
    k6, k7, k8 = tl.load(wo + 6 * K * COUT), tl.load(wo + 7 * K * COUT), tl.load(wo + 8 * K * COUT)
    bias = tl.load(b_ptr + o).to(tl.float32)[None, :]
    prev = tl.full((BLOCK_W, COUT), 0.0, tl.float32)  # output row r − 1
    cur = tl.full((BLOCK_W, COUT), 0.0, tl.float32)  # output row r
    nxt = tl.full((BLOCK_W, COUT), 0.0, tl.float32)  # output row r + 1
    for r in range(h0 - 1, h0 + ROWS + 1):
        row = r + 0 * w
        a = _folded_rows(x_ptr, plane, row, w, 1, D, H, W, CIN, K)  # kd = 0 (tap 1: kh = 1 reads row r)
        prev += tl.dot(a, k2)
        cur += tl.dot(a, k1)
        nxt += tl.dot(a, k0)
        a = _folded_rows(x_ptr, plane, row, w, 4, D, H, W, CIN, K)  # kd = 1
        prev += tl.dot(a, k5)
        cur += tl.dot(a, k4)
        nxt += tl.dot(a, k3)
        a = _folded_rows(x_ptr, plane, row, w, 7, D, H, W, CIN, K)  # kd = 2
        prev += tl.dot(a, k8)
        cur += tl.dot(a, k7)
        nxt += tl.dot(a, k6)
        h = r - 1
        out = y_ptr + ((plane * H + h) * W + w)[:, None] * COUT + o[None, :]
        tl.store(out, (prev + bias).to(y_ptr.dtype.element_ty), mask=((h >= h0) & (h < H) & (w < W))[:, None])
        prev = cur
        cur = nxt
        nxt = tl.full((BLOCK_W, COUT), 0.0, tl.float32)


@triton.jit
def _grad_row(g_ptr, plane, h, w, h0, H, W, CG: tl.constexpr, COUT: tl.constexpr, ROWS: tl.constexpr):
    """[BLOCK_W, COUT]: output-gradient row h ≥ h0 of the plane at positions w; zero past row h0 + ROWS − 1
    (the end of the band this program owns), outside the volume and past CG channels."""
    o = tl.arange(0, COUT)
    ok = (h < h0 + ROWS) & (h < H)
    return tl.load(g_ptr + ((plane * H + h) * W + w)[:, None] * CG + o[None, :],
                   mask=((w < W) & ok)[:, None] & (o[None, :] < CG), other=0.0)


@triton.jit
def weight_grad(x_ptr, g_ptr, out_ptr, D, H, W, bands, tiles_w, strips, CIN: tl.constexpr, CG: tl.constexpr,
                COUT: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    """out (9, K, COUT) += the weight gradient over this program's strips (a strip: ``ROWS`` rows × ``BLOCK_W``
    positions of one plane; program i takes strips i, i + programs, …), all nine taps at once: sweeping
    input rows r, each is read once per kd and multiplies the output-gradient rows r + 1, r, r − 1
    (taps kh = 0, 1, 2), which roll down by one row per step; the partial sums are added atomically."""
    j = tl.arange(0, K)
    o = tl.arange(0, COUT)
    a0 = tl.full((K, COUT), 0.0, tl.float32)  # tap kd·3 + kh
    a1 = tl.full((K, COUT), 0.0, tl.float32)
    a2 = tl.full((K, COUT), 0.0, tl.float32)
    a3 = tl.full((K, COUT), 0.0, tl.float32)
    a4 = tl.full((K, COUT), 0.0, tl.float32)
    a5 = tl.full((K, COUT), 0.0, tl.float32)
    a6 = tl.full((K, COUT), 0.0, tl.float32)
    a7 = tl.full((K, COUT), 0.0, tl.float32)
    a8 = tl.full((K, COUT), 0.0, tl.float32)
    for strip in range(tl.program_id(0), strips, tl.num_programs(0)):
        plane = (strip // (bands * tiles_w)).to(tl.int64)
        rest = strip % (bands * tiles_w)
        h0 = (rest // tiles_w) * ROWS
        w = (rest % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        g_prev = tl.full((BLOCK_W, COUT), 0.0, g_ptr.dtype.element_ty)  # rows h0 − 2, h0 − 1: outside the band
        g_cur = tl.full((BLOCK_W, COUT), 0.0, g_ptr.dtype.element_ty)
        for r in range(h0 - 1, h0 + ROWS + 1):
            row = r + 0 * w
            g_next = _grad_row(g_ptr, plane, row + 1, w, h0, H, W, CG, COUT, ROWS)
            x = tl.trans(_folded_rows(x_ptr, plane, row, w, 1, D, H, W, CIN, K))  # kd = 0
            a0 += tl.dot(x, g_next)
            a1 += tl.dot(x, g_cur)
            a2 += tl.dot(x, g_prev)
            x = tl.trans(_folded_rows(x_ptr, plane, row, w, 4, D, H, W, CIN, K))  # kd = 1
            a3 += tl.dot(x, g_next)
            a4 += tl.dot(x, g_cur)
            a5 += tl.dot(x, g_prev)
            x = tl.trans(_folded_rows(x_ptr, plane, row, w, 7, D, H, W, CIN, K))  # kd = 2
            a6 += tl.dot(x, g_next)
            a7 += tl.dot(x, g_cur)
            a8 += tl.dot(x, g_prev)
            g_prev = g_cur
            g_cur = g_next
    out = out_ptr + j[:, None] * COUT + o[None, :]
    tl.atomic_add(out, a0)
    tl.atomic_add(out + K * COUT, a1)
    tl.atomic_add(out + 2 * K * COUT, a2)
    tl.atomic_add(out + 3 * K * COUT, a3)
    tl.atomic_add(out + 4 * K * COUT, a4)
    tl.atomic_add(out + 5 * K * COUT, a5)
    tl.atomic_add(out + 6 * K * COUT, a6)
    tl.atomic_add(out + 7 * K * COUT, a7)
    tl.atomic_add(out + 8 * K * COUT, a8)
