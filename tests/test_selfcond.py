"""Self-conditioning (train.self_conditioning = "x0"; Chen et al. 2022): the network really receives its
previous x̂0 estimate in training and in every sampler, the estimate changes the result, samples stay
independent of the batch, every mode builds with the extra channels, and resume stays exact."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medgen_cli.config import load
from medgen_cli.diffusion import DDPM, RectifiedFlow
from medgen_cli.engine.sampling import Guidance, Plan, Restart, sample_batch
from medgen_cli.engine.trainer import Trainer
from medgen_cli.errors import ConfigError
from medgen_cli.jobs import build
from medgen_cli.models import selfcond

from conftest import RandomPairs


def _spy(model):
    """Record every call's full network input (after the x̂0 channels went in) and its output."""
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append({"inp": args[0].detach().clone(),
                                                                  "t": args[1].detach().clone()}))
    model.register_forward_hook(lambda m, args, out: calls[-1].update(out=out.detach().clone()))
    return calls


@pytest.mark.parametrize("strategy", ["rflow", "ddpm"])
def test_training_feeds_the_detached_estimate_of_a_first_pass(tiny_preset, tmp_path, strategy):
    p = load(str(tiny_preset(2, strategy=strategy)),
             ['train.self_conditioning="x0"', "train.self_conditioning_prob=1.0", "train.warmup_epochs=0"]).preset
    model = build.build_model(p)
    assert model.conv_in.conv.in_channels == 3  # [x_t, x̂0, mask]
    calls = _spy(model)
    s = build.build_strategy(p)
    ds = RandomPairs(threshold=0.8)
    tr = Trainer(model, s, ds, ds, p.train, tmp_path, "{}", torch.device("cpu"))
    image, cond = next(tr._batches(0))
    tr._step(image, cond)
    assert len(calls) == 2  # a no-grad estimate, then the real forward
    first, second = calls
    assert torch.equal(first["inp"][:, 1], torch.zeros_like(first["inp"][:, 1]))
    assert torch.equal(first["inp"][:, 0], second["inp"][:, 0]) and torch.equal(first["inp"][:, 2], cond[:, 0])
    t = first["t"] / s.T
    want = s.x0_from(first["inp"][:, :1], first["out"], t)
    torch.testing.assert_close(second["inp"][:, 1:2], want)
    assert second["inp"][:, 1].abs().max() > 0
    # p tiny: no sample picked, so no estimate pass and zeros in the channel
    q = load(str(tiny_preset(2, strategy=strategy)),
             ['train.self_conditioning="x0"', "train.self_conditioning_prob=1e-9"]).preset
    model = build.build_model(q)
    calls = _spy(model)
    tr = Trainer(model, s, ds, ds, q.train, tmp_path / "q", "{}", torch.device("cpu"))
    tr._step(image, cond)
    assert len(calls) == 1 and calls[0]["inp"][:, 1].abs().max() == 0


def test_estimate_is_picked_per_sample_with_keyed_draws():
    from medgen_cli.engine.selfcond import picks

    use, run = picks(7, 14, 3, 0, 64, 1, 0.5, "cpu")
    assert run and 10 < int(use.sum()) < 54
    again, _ = picks(7, 14, 3, 0, 64, 1, 0.5, "cpu")
    assert torch.equal(use, again)
    # two data-parallel ranks together draw what one process draws for the global batch
    r0, run0 = picks(7, 14, 3, 0, 32, 2, 0.5, "cpu")
    r1, run1 = picks(7, 14, 3, 32, 32, 2, 0.5, "cpu")
    assert torch.equal(torch.cat([r0, r1]), use) and run0 == run1 == run


class LinearSC(nn.Module):
    """v = a·x + b·x̂0_prev + c (+ condition channel), so the estimate visibly steers the result."""

    def __init__(self, b=0.7, cond=False):
        super().__init__()
        self.b, self.cond, self.inputs = b, cond, []

    def forward(self, inp, mt):
        self.inputs.append(inp.detach().clone())
        out = -0.5 * inp[:, :1] + self.b * inp[:, 1:2] + 0.1
        return out + inp[:, 2:3] if self.cond else out


def _sample(net, plan, strategy=None, b=2, cond_ch=0):
    rf = strategy or RectifiedFlow(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((b, 1, 4, 4), generator=g)
    cond = torch.ones((b, cond_ch, 4, 4))
    return sample_batch(net, rf, noise, cond, plan, keys=[(5, i) for i in range(b)]), rf


@pytest.mark.parametrize("plan", [Plan(solver="euler", steps=4), Plan(solver="heun2", steps=3),
                                  Plan(solver="rk4", steps=2), Plan(solver="dopri5", steps=1),
                                  Plan(solver="euler", steps=4, restart=Restart(1, 2, 0.2, 0.5)),
                                  Plan(solver="ddim", steps=4), Plan(solver="euler", steps=3, guidance=Guidance(2.0))],
                         ids=["euler", "heun2", "rk4", "dopri5", "restart", "ddim", "cfg"])
def test_every_sampler_passes_the_previous_estimate(plan):
    ddim = plan.solver == "ddim"
    guided = plan.guidance is not None
    net = selfcond.enable(LinearSC(cond=guided), 1)
    strategy = DDPM(num_train_timesteps=100, schedule="linear_beta") if ddim else None
    out, s = _sample(net, plan, strategy, cond_ch=1 if guided else 0)
    ins = net.inputs
    starts = 2 if plan.solver == "dopri5" else 1  # adaptive solvers integrate (and self-condition) each sample alone
    assert len(ins) > starts
    zero = [i for i, x in enumerate(ins) if x[:, 1].abs().max() == 0]
    assert zero[0] == 0 and len(zero) == starts  # first evaluation of each integration: zeros
    # then the previous estimate at every evaluation (adaptive: including its trial stages)
    # the estimate steers the result: a model ignoring the channel samples something else
    plain, _ = _sample(selfcond.enable(LinearSC(b=0.0, cond=guided), 1), plan, strategy, cond_ch=1 if guided else 0)
    assert not torch.allclose(out.x, plain.x)


def test_euler_estimate_is_the_previous_evaluations_x0():
    net = selfcond.enable(LinearSC(), 1)
    rf = RectifiedFlow(num_train_timesteps=1000)
    out, _ = _sample(net, Plan(solver="euler", steps=4), rf)
    ts = rf.time_grid(4)
    for k in range(1, 4):
        prev, cur = net.inputs[k - 1], net.inputs[k]
        v = -0.5 * prev[:, :1] + 0.7 * prev[:, 1:2] + 0.1
        want = prev[:, :1] + float(ts[k - 1]) * v  # x̂0 = x_t + t·v̂ at the previous evaluation's time
        torch.testing.assert_close(cur[:, 1:2], want, atol=1e-5, rtol=1e-5)


def test_batch_size_does_not_change_a_self_conditioned_sample():
    p = load("2d-pixel-128", ['train.self_conditioning="x0"', "data.image_size=8", "model.channels=[8,16]",
                              "model.attention_levels=[false,true]", "model.num_head_channels=8",
                              "model.norm_num_groups=8"]).preset
    net = build.build_model(p).eval()
    rf = RectifiedFlow()
    g = torch.Generator().manual_seed(3)
    noise, cond = torch.randn(2, 1, 8, 8, generator=g), (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    keys = [(9, i) for i in range(2)]
    plan = Plan(steps=3, restart=Restart(1, 2, 0.2, 0.5), guidance=Guidance(2.0, 1.0))
    whole = sample_batch(net, rf, noise, cond, plan, keys=keys)
    for i in range(2):
        one = sample_batch(net, rf, noise[i:i + 1], cond[i:i + 1], plan, keys=keys[i:i + 1])
        torch.testing.assert_close(one.x[0], whole.x[i], atol=1e-5, rtol=0)


CASES = {  # mode / model variants that already add input channels: all take the x̂0 channels
    "dual": ["data.mode=\"dual\""],
    "multi": ["data.mode=\"multi\""],
    "seg_conditioned": ["data.mode=\"seg_conditioned\""],
    "seg_conditioned_input": ["data.mode=\"seg_conditioned_input\""],
    "dit": ['model={kind="dit", variant="S", patch_size=2, hidden_size=32, depth=1, num_heads=2}'],
    "s2d": ['space.kind="s2d"'],
    "controlnet": ["controlnet.stage=2"],
    "scoreaug-omega": ['train.scoreaug={mode="compose"}'],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_modes_take_the_estimate_channels(tiny_preset, name):
    p = load(str(tiny_preset(2)), ['train.self_conditioning="x0"', *CASES[name]]).preset
    model = build.build_model(p).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # MONAI zero-initialises the output conv (and ControlNet its residuals): randomise all
        for q in model.parameters():
            q.copy_(torch.randn(q.shape, generator=g) * 0.05)
    img, cond = p.channels()
    n = selfcond.channels(model)
    assert n == img * p.space.factor ** 2
    f = p.space.factor
    side = p.data.image_size // f
    x = torch.randn(2, (img + cond) * f * f, side, side, generator=torch.Generator().manual_seed(1))
    if cond:
        x[:, img * f * f:] = (x[:, img * f * f:] > 0).float()
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        zero = model(x, t)
        est = model(x, t, x0_prev=torch.rand(2, n, side, side))
    assert zero.shape == (2, img * f * f, side, side)
    if name == "controlnet":  # the UNet and its ControlNet copy both read [x_t, x̂0]; the mask goes to the ControlNet
        assert model.unet.in_channels == model.controlnet.conv_in.conv.in_channels == 2 * img
    assert not torch.allclose(zero, est), f"{name}: the estimate channels are ignored"


def test_refused_combinations(tiny_preset):
    with pytest.raises(ConfigError) as e:
        load(str(tiny_preset(2)), ['train.self_conditioning="x0"', "diffrs.enabled=true"])
    assert "self_conditioning" in "\n".join(e.value.lines())


def test_resume_is_exact(tiny_preset, tmp_path):
    """Self-conditioning keeps no state and keys its draws by step: 2 steps == 1 step, save, resume, 1 step."""
    p = load(str(tiny_preset(2)), ['train.self_conditioning="x0"', "train.warmup_epochs=0"]).preset
    ds = RandomPairs(threshold=0.8)

    def trainer(run):
        return Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, run, "{}", torch.device("cpu"))

    def steps(tr, k):
        while k:
            for image, cond in tr._batches(tr.state.epoch):
                tr._step(image, cond)
                tr.state.pos += 1
                k -= 1
                if not k:
                    return
            tr.state.epoch, tr.state.pos = tr.state.epoch + 1, 0

    full = trainer(tmp_path / "full")
    steps(full, 2)
    half = trainer(tmp_path / "half")
    steps(half, 1)
    step_dir = half.save()
    again = trainer(tmp_path / "half")
    again.resume(step_dir)
    steps(again, 1)
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_and_samples(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    r = cli("train", "--preset", tiny_preset(2), "--data", phantom_root, "--run-dir", run, "--max-steps", 1,
            "--set", 'train.self_conditioning="x0"', "--set", "train.preview_every=0", "--set",
            "train.val_max_items=1", "--device", "cpu")
    assert r.code == 0, r.err
    assert json.loads((run / "config.json").read_text())["preset"]["train"]["self_conditioning"] == "x0"
    r = cli("sample", "--run", run, "--data", phantom_root, "--out", tmp_path / "s", "--n", 1, "--steps", 2, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[0])["nfe"] == 2
