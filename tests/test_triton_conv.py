"""engine/triton_conv.py: our Triton 3×3×3 convolution against PyTorch's, run by Triton's CPU interpreter."""

import pytest
import torch
import torch.nn.functional as F

from medgen_cli.engine import triton_conv
from medgen_cli.engine.fastpath import channels_last as cl
from medgen_cli.engine.triton_conv import TritonConv3d, conv3x3x3, swap_triton_convs


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels run in Triton's interpreter, on CPU tensors (``@triton.jit`` reads TRITON_INTERPRET when
    it decorates, so the kernels' module is loaded again under it, and again without it afterwards)."""
    import importlib

    from medgen_cli.engine import triton_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(triton_kernels)
    yield
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(triton_kernels)


@pytest.mark.parametrize("n,cin,cout,spatial,rows,block_w", [
    (1, 2, 16, (3, 4, 5), 2, 16),      # the 2-channel input conv: K padded 6 → 16, bands of 2 rows
    (2, 16, 16, (4, 7, 37), 3, 16),    # H = 7 in bands of 3 (the last one ragged), ragged W, batch 2
    (1, 16, 1, (3, 5, 20), 8, 16),     # the 1-channel output conv (C_out padded 1 → 16); a band longer than H
    (1, 32, 32, (2, 3, 9), 1, 32),     # K = 96 padded to 128; bands of one row
    (1, 4, 8, (2, 3, 9), 2, 16),       # a latent UNet's input conv: K 12 → 16, C_out 8 → 16
    (1, 8, 4, (2, 3, 9), 2, 16),       # K 24 → 32, C_out 4 → 16
])
def test_kernel_equals_conv3d(interpreted, n, cin, cout, spatial, rows, block_w):
    g = torch.Generator().manual_seed(cin + cout)
    x = cl(torch.randn(n, cin, *spatial, generator=g))
    w, b = torch.randn(cout, cin, 3, 3, 3, generator=g), torch.randn(cout, generator=g)
    ref = F.conv3d(x, w, b, padding=1)
    y = conv3x3x3(x, w, b, rows, block_w)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    no_bias = conv3x3x3(x, w, None, rows, block_w)
    assert (no_bias - F.conv3d(x, w, padding=1)).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("cin,cout,spatial,rows,block_w,programs", [
    (2, 16, (3, 7, 19), 3, 16, 4),     # strips of 3 rows, the last ragged; more strips than programs
    (16, 1, (2, 5, 7), 8, 16, 64),     # one output channel (padded to 16 inside); a strip longer than H,
                                       # more programs than strips: capped
    (16, 16, (3, 4, 33), 1, 32, 5),    # strips of one row, ragged W
])
def test_weight_grad_kernel_equals_conv3d(interpreted, cin, cout, spatial, rows, block_w, programs):
    g = torch.Generator().manual_seed(cin * cout)
    x = cl(torch.randn(2, cin, *spatial, generator=g))
    w = torch.randn(cout, cin, 3, 3, 3, generator=g).requires_grad_()
    up = torch.randn(2, cout, *spatial, generator=g)
    (ref,) = torch.autograd.grad(F.conv3d(x, w, padding=1), w, up)
    ours = triton_conv.conv3x3x3_weight_grad(x, up, rows, block_w, programs=programs)
    assert ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_custom_op_is_consistent(interpreted):
    """torch.library's own checks (schema, fake tensor shapes and strides, autograd registration, tracing
    through AOTAutograd with dynamic shapes) on the op the compiled graphs call."""
    g = torch.Generator().manual_seed(0)
    x = cl(torch.randn(1, 16, 2, 3, 17, generator=g))
    w, b = torch.randn(16, 16, 3, 3, 3, generator=g), torch.randn(16, generator=g)
    torch.library.opcheck(torch.ops.medgen.conv3x3x3.default, (x, w, b))  # all checks, autograd included
    torch.library.opcheck(torch.ops.medgen.conv3x3x3_weight_grad.default, (x, torch.randn_like(x)))
    torch.library.opcheck(torch.ops.medgen.conv3x3x3.default, (x.requires_grad_(), w.requires_grad_(), b))
    assert (torch.ops.medgen.conv3x3x3(x, w, b) - F.conv3d(x, w, b, padding=1)).abs().max() < 1e-4


@pytest.mark.parametrize("cin,cout,weight_grad", [(2, 16, "triton"), (16, 1, "triton"), (16, 16, "aten"),
                                                   (16, 16, "triton")])
def test_gradients_equal_conv3d(interpreted, monkeypatch, cin, cout, weight_grad):
    """The op's backward: the input gradient through the kernel on flipped, channel-swapped weights; the
    weight gradient through our kernel or ATen; the bias gradient a sum; strips of 3 rows × 16, so more
    than one program per plane."""
    monkeypatch.setattr(triton_conv, "WEIGHT_GRAD", weight_grad)
    strip = {"rows": 3, "block_w": 16}
    monkeypatch.setattr(triton_conv, "FORWARD", strip)
    monkeypatch.setattr(triton_conv, "weight_grad_strip", lambda cin: strip)
    g = torch.Generator().manual_seed(3)
    x = cl(torch.randn(2, cin, 3, 4, 19, generator=g)).requires_grad_()
    w = torch.randn(cout, cin, 3, 3, 3, generator=g).requires_grad_()
    b = torch.randn(cout, generator=g).requires_grad_()
    up = torch.randn(2, cout, 3, 4, 19, generator=g)
    ours = torch.autograd.grad(torch.ops.medgen.conv3x3x3(x, w, b), (x, w, b), up)
    ref = torch.autograd.grad(F.conv3d(x, w, b, padding=1), (x, w, b), up)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape and (a - r).abs().max() <= 1e-5 * r.abs().max()
    (gx,) = torch.autograd.grad(torch.ops.medgen.conv3x3x3(x, w.detach(), None), x, up)  # x only, no bias
    assert (gx - ref[0]).abs().max() <= 1e-5 * ref[0].abs().max()


def test_swap_takes_only_small_3x3x3_convs_and_cpu_tensors_stay_on_pytorch():
    net = torch.nn.Sequential(torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.Conv3d(16, 32, 3, padding=1),
                              torch.nn.Conv3d(64, 16, 1), torch.nn.Conv3d(16, 16, 3, padding=1, stride=2))
    ref = [type(m) for m in net]
    swap_triton_convs(net)
    assert [type(m) for m in net] == [TritonConv3d, *ref[1:]]
    x = torch.randn(1, 16, 4, 4, 4)
    plain = torch.nn.Conv3d(16, 16, 3, padding=1)
    plain.load_state_dict(net[0].state_dict())
    assert torch.equal(net[0](x), plain(x))  # a CPU tensor: PyTorch's convolution


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cin,cout", [(2, 16), (16, 16), (32, 32), (16, 1)])
def test_compiled_kernel_in_bf16_on_cuda(cin, cout):
    """The real (compiled) kernels in bf16, every strip size the benchmark tries, ragged H and W: the
    convolution and the weight gradient against float32 PyTorch."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = cl(torch.randn(2, cin, 5, 11, 70, device="cuda", generator=g)).bfloat16()
    w = torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g).bfloat16()
    b = torch.randn(cout, device="cuda", generator=g).bfloat16()
    ref = F.conv3d(x.float(), w.float(), b.float(), padding=1)
    up = cl(torch.randn(ref.shape, device="cuda", generator=g)).bfloat16()
    wf = w.float().requires_grad_()
    (ref_w,) = torch.autograd.grad(F.conv3d(x.float(), wf, padding=1), wf, up.float())
    for rows, bw in triton_conv.STRIPS:
        y = conv3x3x3(x, w, b, rows, bw)
        assert y.dtype == torch.bfloat16 and (cout == 1 or y.is_contiguous(memory_format=torch.channels_last_3d))
        assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (rows, bw)
        gw = triton_conv.conv3x3x3_weight_grad(x, up, rows, bw)
        assert (gw - ref_w).abs().max() <= 1e-2 * ref_w.abs().max(), (rows, bw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swapped_conv_trains_like_conv3d_under_autocast_on_cuda():
    """TritonConv3d under bf16 autocast (as `train.compile` runs it): bf16 output, and values and all three
    gradients within bf16 rounding of nn.Conv3d's under the same autocast."""
    torch.manual_seed(0)
    ref = torch.nn.Conv3d(16, 16, 3, padding=1).cuda()
    ours = swap_triton_convs(torch.nn.Sequential(torch.nn.Conv3d(16, 16, 3, padding=1).cuda()))[0]
    ours.load_state_dict(ref.state_dict())
    x = cl(torch.randn(1, 16, 6, 10, 70, device="cuda"))
    up = torch.randn(1, 16, 6, 10, 70, device="cuda")
    out = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        out.append((y, *torch.autograd.grad(y, (xi, m.weight, m.bias), up)))
    assert out[1][0].dtype == torch.bfloat16
    for a, r in zip(out[1], out[0]):
        assert (a.float() - r.float()).abs().max() <= 2e-2 * r.float().abs().max()


def test_triton_convs_are_the_default_on_cuda_only_and_can_be_switched_off(monkeypatch):
    from medgen_cli.engine.fastpath import exact_fast_ops, triton_convs_default

    monkeypatch.delenv("MEDGEN_TRITON_CONVS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100/H200
    assert triton_convs_default(torch.device("cuda")) and not triton_convs_default(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100: no bf16 dot
    assert not triton_convs_default(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setenv("MEDGEN_TRITON_CONVS", "0")
    assert not triton_convs_default(torch.device("cuda"))
    conv = lambda: torch.nn.Sequential(torch.nn.Conv3d(16, 16, 3, padding=1))  # noqa: E731
    assert type(exact_fast_ops(conv())[0]) is torch.nn.Conv3d  # CPU parameters: cuDNN's (PyTorch's) path
    assert type(exact_fast_ops(conv(), triton_convs=True)[0]) is TritonConv3d


def test_the_op_traces_under_activation_checkpointing(interpreted):
    """The 3D presets train with gradient checkpointing: the op inside a non-reentrant checkpoint, traced
    by torch.compile's AOTAutograd (``aot_eager``: the tracing without Inductor), recomputes and gives
    conv3d's values and gradients."""
    g = torch.Generator().manual_seed(0)
    x = cl(torch.randn(1, 16, 2, 3, 17, generator=g)).requires_grad_()
    w = torch.randn(16, 16, 3, 3, 3, generator=g).requires_grad_()

    def block(a, conv):
        return torch.utils.checkpoint.checkpoint(lambda a: conv(a).sin(), a, use_reentrant=False)

    ours = torch.compile(block, backend="aot_eager")(x, lambda a: torch.ops.medgen.conv3x3x3(a, w, None))
    ref = block(x, lambda a: F.conv3d(a, w, padding=1))
    assert (ours - ref).abs().max() <= 1e-4  # sin of float32 convolutions of size ~20
    for a, r in zip(torch.autograd.grad((ours * ours).sum(), (x, w)), torch.autograd.grad((ref * ref).sum(), (x, w))):
        assert (a - r).abs().max() <= 1e-4 * r.abs().max()
