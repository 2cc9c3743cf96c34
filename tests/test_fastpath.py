"""The fast path (engine/fastpath.py) gives what the eager fp32 network gives, within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from medgen_cli.engine.fastpath import FastNet, channels_last, exact_fast_ops, to_channels_last
from medgen_cli.models.unet import build_unet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_unet(dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_unet(dims, 2, 1, (16, 32), (False, True), 1, 16, norm_num_groups=8, use_flash_attention=True)
    for p in net.out.parameters():  # MONAI zero-initialises the output convolution: make it see something
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def inputs(dims: int, batch: int = 2, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 2, *((8,) * dims), generator=g).to(device)
    return x, torch.tensor([100.0, 700.0][:batch], device=device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_channels_last_matches_eager_fp32(dims):
    net = tiny_unet(dims)
    x, t = inputs(dims)
    with torch.no_grad():
        ref = net(x, t)
    fast = FastNet(net, torch.device("cpu"), compile=False, graphs=False, dtype=torch.bfloat16, layout=True)
    y = fast(x, t)
    assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == ref.shape
    assert 0 < rel_err(y, ref) < 3e-2  # bf16 rounding, not equality: the path really changed
    assert next(fast.module.parameters()).dtype == torch.bfloat16
    conv = next(m for m in fast.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
    assert next(net.parameters()).dtype == torch.float32  # the caller's network is untouched


def test_channels_last_keeps_values_and_changes_strides():
    net = tiny_unet(3)
    x, t = inputs(3)
    with torch.no_grad():
        ref = net(x, t)
        y = to_channels_last(tiny_unet(3))(channels_last(x), t)
    assert rel_err(y, ref) < 1e-5
    assert channels_last(x).stride() != x.stride()


@pytest.mark.parametrize("dims", [2, 3])
def test_dynamo_traced_fast_ops_match_eager_without_grad(dims, monkeypatch, tmp_path):
    """What sampling compiles — the swapped blocks traced by Dynamo under no_grad (backend "eager": the
    trace without Inductor's CPU compile) — gives the eager network's values. Dynamo mis-bound a variadic
    autograd.Function there, and compiled sampling concatenated only the skip (session 12)."""
    import functools

    net = tiny_unet(dims)
    x, t = inputs(dims)
    with torch.no_grad():
        ref = net(x, t)
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # FastNet's compile cache stays here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    fast = FastNet(net, torch.device("cpu"), compile=True, graphs=False, dtype=torch.float32, layout=True)
    assert rel_err(fast(x, t), ref) < 1e-5


@pytest.mark.parametrize("dims,layout", [(3, False), (3, True), (2, True)])
def test_exact_fast_ops_give_the_same_values_and_gradients(dims, layout):
    """The swapped modules (3D input/output convolutions, upsampling, GroupNorm, the UNet blocks) equal
    MONAI's (fp32, forward and backward) and keep the state dict; with channels-last inputs every
    convolution sees channels-last inputs and output gradients."""
    import copy

    names = lambda net: {type(m).__name__ for m in net.modules()}  # noqa: E731
    net = tiny_unet(dims).train()
    with torch.no_grad():  # MONAI zero-initialises some convolutions: no gradient would reach conv_in
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    fast = exact_fast_ops(copy.deepcopy(net))
    convs = {"_DepthFoldConv3d", "_PaddedOutConv3d"} if dims == 3 else set()
    blocks = {f"_{n}" for n in names(net) & {"AttnDownBlock", "AttnMidBlock", "AttnUpBlock", "UpBlock"}}
    assert len(blocks) >= 3  # the decoder's concatenations and attention blocks
    assert names(fast) - names(net) == convs | blocks | {"_RepeatUpsample", "_ChannelStatsGroupNorm"}
    assert list(fast.state_dict()) == list(net.state_dict())
    x, t = inputs(dims)
    x = x[..., :6]  # depth ≠ height ≠ width catches a transposed fold
    seen = []  # channels-last in, channels-last throughout: every convolution's input and output gradient
    if layout:
        fast, x = to_channels_last(fast), channels_last(x)
        fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
        cl = lambda a: a.is_contiguous(memory_format=fmt)  # noqa: E731
        for m in fast.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                m.register_forward_pre_hook(lambda m, a: seen.append(("input", cl(a[0]))))
                m.register_full_backward_pre_hook(lambda m, g: seen.append(("output gradient", cl(g[0]))))
    threads = torch.get_num_threads()
    # on one thread a CPU 1×1 convolution with a batch under 16 takes a path that returns channel-first outputs
    torch.set_num_threads(max(2, threads))
    try:
        ys = [m(x, t) for m in (net, fast)]
        assert rel_err(ys[1], ys[0]) < 1e-5
        for y in ys:
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert all(ok for _, ok in seen), [what for what, ok in seen if not ok]
    assert len(seen) > 20 or not layout
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (net, fast)]
    assert rel_err(grads[1], grads[0]) < 1e-5
    for m in (net.conv_in.conv, net.out[-1].conv):  # the (3D: swapped) input and output convolutions' weights
        name = next(n for n, p in net.named_parameters() if p is m.weight)
        a, b = m.weight.grad, fast.get_parameter(name).grad
        assert a.abs().max() > 0 and rel_err(b, a) < 1e-5, name
    up = torch.nn.Upsample(scale_factor=(2.0, 3.0), mode="nearest")
    z = torch.randn(2, 3, 4, 5)
    assert torch.equal(exact_fast_ops(copy.deepcopy(up))(z), up(z))


@pytest.mark.parametrize("dims", [2, 3])
def test_channel_stats_group_norm_equals_group_norm_and_keeps_the_layout(dims):
    import copy

    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(gn.weight), torch.nn.init.normal_(gn.bias)
    ours = exact_fast_ops(torch.nn.Sequential(copy.deepcopy(gn)))[0]
    assert type(ours).__name__ == "_ChannelStatsGroupNorm"
    assert type(exact_fast_ops(torch.nn.Sequential(copy.deepcopy(gn)), group_norm=False)[0]) is torch.nn.GroupNorm
    x = channels_last(torch.randn(2, 16, *((5,) * dims)) * 3 + 1).requires_grad_()
    ys = [m(x) for m in (gn, ours)]
    assert rel_err(ys[1], ys[0]) < 1e-5 and ys[1].stride() == x.stride()  # channels-last in and out
    g = torch.randn_like(ys[0])
    grads = [torch.autograd.grad(y, (x, m.weight, m.bias), g) for y, m in zip(ys, (gn, ours))]
    for a, b in zip(*grads):
        assert rel_err(b, a) < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype autocast gives GroupNorm
        a, b = gn(x.bfloat16()), ours(x.bfloat16())
    assert a.dtype == b.dtype and rel_err(b.float(), a.float()) < 1e-2
    with torch.no_grad():  # bf16 weights, no autocast (the sampling fast path): bf16 out
        a, b = copy.deepcopy(gn).bfloat16()(x.bfloat16()), copy.deepcopy(ours).bfloat16()(x.bfloat16())
    assert a.dtype == b.dtype == torch.bfloat16 and rel_err(b.float(), a.float()) < 1e-2
    flat = torch.randn(3, 16)  # (B, C): no spatial dimensions, GroupNorm's own path
    assert rel_err(ours(flat), gn(flat)) < 1e-6


@pytest.mark.gpu
@cuda
def test_channel_stats_group_norm_under_cuda_autocast_and_compile():
    import copy

    gn = torch.nn.GroupNorm(4, 16).cuda()
    ours = exact_fast_ops(torch.nn.Sequential(copy.deepcopy(gn)))[0]
    x = channels_last(torch.randn(1, 16, 6, 8, 10, device="cuda")).bfloat16()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b, c = gn(x), ours(x), torch.compile(ours)(x)
    assert a.dtype == b.dtype == c.dtype == torch.float32
    assert rel_err(b, a) < 1e-5 and rel_err(c, a) < 1e-5 and c.is_contiguous(memory_format=torch.channels_last_3d)


def test_self_conditioned_network_is_seen_through():
    from medgen_cli.models.selfcond import ATTR, channels

    net = tiny_unet(2)
    setattr(net, ATTR, 1)
    assert channels(FastNet(net, torch.device("cpu"), compile=False)) == 1


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dims,options", [(2, {}), (3, {}), (3, {"autotune_convs": True}), (3, "cudnn_convs")])
def test_compiled_graph_path_matches_eager_fp32_on_cuda(dims, options, monkeypatch):
    import functools

    from medgen_cli.engine import fastpath

    if options == "cudnn_convs":  # cuDNN, not engine/triton_conv.py's kernel (the default on CUDA), for 3×3×3
        monkeypatch.setattr(fastpath, "exact_fast_ops", functools.partial(fastpath.exact_fast_ops, triton_convs=False))
        options = {}
    dev = torch.device("cuda")
    net = tiny_unet(dims).to(dev)
    fast = FastNet(net, dev, **options)  # bf16, channels-last, compile, CUDA graphs
    for seed in (1, 2):  # a second input through the same graph: its inputs are really copied in
        x, t = inputs(dims, device=dev)
        x = x + seed
        with torch.no_grad():
            ref = net(x, t)
        y = fast(x, t)
        assert rel_err(y, ref) < 3e-2
    assert len(fast.graphs) == 1
    x, t = inputs(dims, batch=1, device=dev)  # a new signature gets its own graph
    with torch.no_grad():
        assert rel_err(fast(x, t), net(x, t)) < 3e-2
    assert len(fast.graphs) == 2


@pytest.mark.gpu
@cuda
def test_compiled_channels_last_training_tracks_eager_fp32(cli, tiny_preset, phantom_root, tmp_path):
    """20 steps of the compiled bf16 channels-last trainer, replayed from CUDA graphs, stay near the eager
    fp32 trainer's losses, and the compiled run checkpoints and resumes (optimizer moments back in the
    parameters' layout)."""
    import json

    preset = tiny_preset(3)
    losses = {}
    for name, sets in (("fast", ["train.compile=true", 'train.compile_mode="reduce-overhead"',
                                 'train.precision="bf16"']),
                       ("fp32", ['train.precision="fp32"'])):
        run = tmp_path / name
        args = ["train", "--preset", preset, "--data", phantom_root, "--run-dir", run, "--device", "cuda",
                "--max-steps", 20, "--set", "train.log_every=1", "--set", "train.epochs=10"]  # 3 steps an epoch
        for s in sets:
            args += ["--set", s]
        r = cli(*args)
        assert r.code == 0, r.err
        losses[name] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                        if json.loads(x)["kind"] == "train"]
    a, b = torch.tensor(losses["fast"]), torch.tensor(losses["fp32"])
    assert len(a) == len(b) == 20
    assert float(((a - b).abs() / b.abs()).max()) < 0.05
    r = cli("train", "--resume", "--run-dir", tmp_path / "fast", "--device", "cuda", "--max-steps", 24)
    assert r.code == 0, r.err


def test_cuda_graph_compile_mode_is_for_one_cuda_process(tiny_preset, tmp_path, monkeypatch):
    """train.compile_mode="reduce-overhead" replays CUDA graphs on CUDA only (several processes: as
    train.parallel "allreduce", tests/test_ddp.py); on the CPU the network is compiled in the default mode
    (no graphs) and the step marks nothing."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the compile cache stays here
    from conftest import RandomPairs
    from medgen_cli.config import load
    from medgen_cli.engine.trainer import Trainer
    from medgen_cli.jobs import build

    p = load(str(tiny_preset(2)), ["train.compile=true", 'train.compile_mode="reduce-overhead"']).preset
    assert p.train.compile_mode == "reduce-overhead"
    ds = RandomPairs()
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, "{}", torch.device("cpu"))
    assert tr._graph_steps is False and hasattr(tr.net, "_orig_mod")
    with pytest.raises(Exception, match="invalid preset"):
        load(str(tiny_preset(2)), ['train.compile_mode="fastest"'])
