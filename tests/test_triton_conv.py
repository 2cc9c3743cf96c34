"""engine/triton_conv.py: our Triton 3×3×3 convolution against PyTorch's, run by Triton's CPU interpreter."""

import pytest
import torch
import torch.nn.functional as F

from medgen_cli.engine import triton_conv
from medgen_cli.engine.triton_conv import TritonConv3d, conv3x3x3, swap_triton_convs


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels built while this is active run in Triton's interpreter, on CPU tensors."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_conv._kernel.cache_clear()
    yield
    triton_conv._kernel.cache_clear()


def cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("n,cin,cout,spatial,block_h,block_w", [
    (1, 2, 16, (3, 4, 5), 1, 16),     # the 2-channel input conv: K padded 6 → 16
    (2, 16, 16, (4, 3, 37), 2, 16),   # H and W not multiples of the tile, batch 2 (the plane index carries n)
    (1, 16, 1, (3, 5, 20), 4, 16),    # the 1-channel output conv: C_out padded 1 → 16, sliced back
    (1, 32, 32, (2, 3, 9), 1, 32),    # K = 96 padded to 128
])
def test_kernel_equals_conv3d(interpreted, n, cin, cout, spatial, block_h, block_w):
    g = torch.Generator().manual_seed(cin + cout)
    x = cl(torch.randn(n, cin, *spatial, generator=g))
    w, b = torch.randn(cout, cin, 3, 3, 3, generator=g), torch.randn(cout, generator=g)
    ref = F.conv3d(x, w, b, padding=1)
    y = conv3x3x3(x, w, b, block_h=block_h, block_w=block_w)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    no_bias = conv3x3x3(x, w, None, block_h=block_h, block_w=block_w)
    assert (no_bias - F.conv3d(x, w, padding=1)).abs().max() <= 1e-5 * ref.abs().max()


def test_the_custom_op_is_consistent(interpreted):
    """torch.library's own checks (fake tensor shapes and strides, schema, no aliasing) on the op the
    fast path's compiled graph calls."""
    g = torch.Generator().manual_seed(0)
    x = cl(torch.randn(1, 16, 2, 3, 17, generator=g))
    w, b = torch.randn(16, 16, 3, 3, 3, generator=g), torch.randn(16, generator=g)
    torch.library.opcheck(torch.ops.medgen.conv3x3x3.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))
    assert (torch.ops.medgen.conv3x3x3(x, w, b) - F.conv3d(x, w, b, padding=1)).abs().max() < 1e-4


def test_swap_takes_only_small_3x3x3_convs_and_cpu_tensors_stay_on_pytorch():
    net = torch.nn.Sequential(torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.Conv3d(32, 64, 3, padding=1),
                              torch.nn.Conv3d(64, 16, 1), torch.nn.Conv3d(16, 16, 3, padding=1, stride=2))
    ref = [type(m) for m in net]
    swap_triton_convs(net)
    assert [type(m) for m in net] == [TritonConv3d, *ref[1:]]
    x = torch.randn(1, 16, 4, 4, 4)
    plain = torch.nn.Conv3d(16, 32, 3, padding=1)
    plain.load_state_dict(net[0].state_dict())
    assert torch.equal(net[0](x), plain(x))  # a CPU tensor: PyTorch's convolution


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cin,cout", [(2, 16), (16, 16), (32, 32), (16, 1)])
def test_compiled_kernel_in_bf16_on_cuda(cin, cout):
    """The real (compiled) kernel in bf16, every tile size the benchmark tries, ragged H and W."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = cl(torch.randn(2, cin, 5, 11, 70, device="cuda", generator=g)).bfloat16()
    w = torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g).bfloat16()
    b = torch.randn(cout, device="cuda", generator=g).bfloat16()
    ref = F.conv3d(x.float(), w.float(), b.float(), padding=1)
    for bh, bw in triton_conv.TILES:
        y = conv3x3x3(x, w, b, bh, bw)
        assert y.dtype == torch.bfloat16 and (cout == 1 or y.is_contiguous(memory_format=torch.channels_last_3d))
        assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max(), (bh, bw)
