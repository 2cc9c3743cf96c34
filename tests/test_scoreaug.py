"""ScoreAug, SDA, regional weighting, bf16 loss, torch.compile: each transform acts identically on
input and target, patterns and omega are as documented, draws are keyed per step, options change training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medgen_cli.config import load
from medgen_cli.config.schema import ScoreAugConfig
from medgen_cli.engine import sda, tricks
from medgen_cli.engine.scoreaug import (OMEGA_DIM, PATTERN_FRACTIONS, SPATIAL_2D, SPATIAL_3D, Op, ScoreAug,
                                        pattern_mask)
from medgen_cli.engine.trainer import Trainer
from medgen_cli.errors import ConfigError
from medgen_cli.jobs import build

from conftest import RandomPairs


def ops(dims: int) -> list[Op]:
    """One Op per transform kind (every spatial element, translation, cutout, every pattern, brightness)."""
    out = [Op(dims, spatial=s) for s in (SPATIAL_2D if dims == 2 else SPATIAL_3D)]
    out.append(Op(dims, shift=(0.125, -0.25) if dims == 2 else (0.2, -0.4, 0.2)))
    out.append(Op(dims, cutout=(0.25, 0.3, 0.1, 0.5)))
    out += [Op(dims, pattern=k) for k in range(16)]
    out.append(Op(dims, brightness=1.15))
    out.append(Op(dims, spatial=("rot", 1), shift=(0.2,) * dims, cutout=(0.2, 0.2, 0.3, 0.3), brightness=0.9))
    return out


class Echo:
    """An identity "model" strategy: x_t = x0, target = x0, the network returns its image channels."""

    T = 100

    def noisy(self, x0, noise, t):
        return x0

    def target(self, x0, noise, t):
        return x0

    def model_time(self, t):
        return t


@pytest.mark.parametrize("dims", [2, 3])
def test_each_transform_acts_identically_on_input_condition_and_target(dims):
    g = torch.Generator().manual_seed(0)
    shape = (2, 1, 16, 16) if dims == 2 else (2, 1, 8, 16, 16)
    x = torch.rand(shape, generator=g) + 0.5
    vec = torch.full(shape, 0.3)  # a trailing vector channel (constant map): never transformed
    sa = ScoreAug(ScoreAugConfig(), dims, seed=0)
    for op in ops(dims):
        inp, target = sa.augment(op, torch.cat([x, x, vec], 1), x, n_image=1, n_vector=1)
        assert torch.equal(inp[:, :1], target), op  # noisy image and target: same transform
        assert torch.equal(inp[:, 2:], vec)
        if op.brightness is None:
            assert torch.equal(inp[:, 1:2], target), op  # condition map: same geometric transform
        else:
            assert torch.allclose(inp[:, 1:2] * op.brightness, target)  # masks are not brightness-scaled
        assert not torch.equal(target, x), op  # every op does something
        assert target.shape == x.shape


@pytest.mark.parametrize("dims", [2, 3])
def test_equivariance_through_the_loss_with_an_identity_model(dims):
    """With target = x_t and a network that returns its input image channels, the augmented loss is 0
    for every drawn ω only if input and target were transformed identically."""
    shape = (2, 1, 16, 16) if dims == 2 else (1, 1, 8, 16, 16)
    image = torch.rand(shape) + 0.5
    cond = (torch.rand(shape) > 0.7).float()
    p = load("demo", ['train.scoreaug={mode="v2", brightness=1.3}', f"data.dims={dims}",
                      "data.image_size=16", "data.pad_depth_to=16", "data.depth=8"]).preset
    extras = tricks.LossExtras(p.train, {}, "bravo", dims, 0, omega=True)
    seen = set()
    for step in range(40):
        net = lambda inp, t, omega=None: inp[:, :1]  # noqa: E731
        loss = extras.loss(net, Echo(), image, cond, torch.full((shape[0],), 0.5), image, None, step)
        assert float(loss) == 0.0
        op = extras.scoreaug.draw(step)
        seen |= {k for k in ("spatial", "shift", "cutout", "pattern", "brightness") if getattr(op, k) is not None}
    assert seen == {"spatial", "shift", "cutout", "pattern", "brightness"}
    wrong = lambda inp, t, omega=None: image  # noqa: E731  # ignores the transform: loss > 0 on some steps
    assert max(float(extras.loss(wrong, Echo(), image, cond, torch.full((shape[0],), 0.5), image, None, s))
               for s in range(10)) > 0


def test_patterns_zero_the_documented_fractions_and_3d_repeats_the_mask():
    for pid in range(16):
        for size in (16, 128):
            m = pattern_mask(pid, size, size)
            assert set(m.unique().tolist()) <= {0.0, 1.0}
            assert math.isclose(1 - m.mean().item(), PATTERN_FRACTIONS[pid], abs_tol=1e-6), (pid, size)
        assert torch.equal(pattern_mask(pid, 16, 16), pattern_mask(pid, 16, 16))  # fixed
    assert len({tuple(pattern_mask(k, 16, 16).flatten().tolist()) for k in range(16)}) == 16  # all distinct
    vol = Op(3, pattern=5).apply(torch.ones(1, 1, 6, 16, 16))
    assert all(torch.equal(vol[0, 0, d], pattern_mask(5, 16, 16)) for d in range(6))


def test_omega_encoding_dims_and_identity():
    assert Op(2).encode().shape == (OMEGA_DIM,) and not Op(2).encode().any()  # identity = all zeros
    assert Op(2).encode(identity_flag=True).nonzero().flatten().tolist() == [0]  # the reference's leak
    v = Op(2, spatial=("rot", 3)).encode()
    assert v[0] == 1 and v[4 + 2] == 1 and math.isclose(v[10].item(), 1.0) and v[1:4].sum() == 0
    assert Op(2, spatial=("rot_hflip", 1)).encode()[9] == 1 and Op(3, spatial=("dflip", 0)).encode()[9] == 1
    v = Op(2, shift=(0.1, -0.3)).encode()
    assert v[1] == 1 and torch.allclose(v[11:14], torch.tensor([-0.3, 0.1, 0.0]))  # (x, y, 0)
    v = Op(3, shift=(0.2, 0.0, -0.4)).encode()
    assert torch.allclose(v[11:14], torch.tensor([0.2, 0.0, -0.4]))
    v = Op(2, cutout=(0.2, 0.25, 0.0, 0.0)).encode()
    assert v[2] == 1 and torch.allclose(v[14:16], torch.tensor([0.2, 0.25]))
    v = Op(2, pattern=11).encode()
    assert v[3] == 1 and v[16 + 11] == 1 and v[16:32].sum() == 1
    assert math.isclose(Op(2, brightness=1.2).encode()[32].item(), math.log(1.2), rel_tol=1e-6)
    codes = {tuple(o.encode().tolist()) for o in ops(2)} | {tuple(Op(2).encode().tolist())}
    assert len(codes) == len(ops(2)) + 1  # every transform has its own code, none equals identity


def test_draws_are_keyed_per_step_and_modes_behave():
    single = ScoreAug(ScoreAugConfig(mode="single", flip=False), 2, seed=3)
    assert [single.draw(s) for s in range(20)] == [ScoreAug(ScoreAugConfig(mode="single", flip=False), 2, 3).draw(s)
                                                   for s in range(20)]
    draws = [single.draw(s) for s in range(300)]
    assert len({repr(d) for d in draws}) > 100  # different steps, different ω
    parts = [sum(getattr(d, k) is not None for k in ("spatial", "shift", "cutout", "pattern", "brightness"))
             for d in draws]
    assert max(parts) == 1 and 50 < parts.count(0) < 110  # one transform or identity (1/4)
    assert all(d.spatial is None or d.spatial[0] == "rot" for d in draws)  # flips off
    assert ScoreAug(ScoreAugConfig(), 2, seed=4).draw(0) != ScoreAug(ScoreAugConfig(), 2, seed=5).draw(0) or \
        ScoreAug(ScoreAugConfig(), 2, seed=4).draw(1) != ScoreAug(ScoreAugConfig(), 2, seed=5).draw(1)
    comp = [ScoreAug(ScoreAugConfig(mode="compose", compose_prob=0.8), 3, 1).draw(s) for s in range(200)]
    assert 0.7 < sum(d.cutout is not None for d in comp) / 200 < 0.9 and not any(d.pattern for d in comp)
    assert all(d.spatial in SPATIAL_3D for d in comp if d.spatial)
    v2 = [ScoreAug(ScoreAugConfig(mode="v2"), 2, 1).draw(s) for s in range(400)]
    destructive = [d for d in v2 if d.cutout is not None or d.pattern is not None]
    assert 150 < len(destructive) < 250 and not any(d.cutout is not None and d.pattern is not None for d in v2)
    assert 0.35 < sum(d.pattern is not None for d in destructive) / len(destructive) < 0.65


@pytest.mark.parametrize("kind", ["unet", "dit", "multi"])
def test_omega_wrapper_starts_as_identity_and_reaches_the_time_embedding(kind):
    sets = ['train.scoreaug={mode="v2"}', "data.image_size=16", "model.channels=[8,16]",
            "model.attention_levels=[false,true]", "model.num_head_channels=8", "model.norm_num_groups=8"]
    if kind == "dit":
        sets = ['train.scoreaug={mode="v2"}', "data.image_size=16",
                'model={kind="dit", hidden_size=32, depth=2, num_heads=2, patch_size=4}']
    if kind == "multi":
        sets.append('data.mode="multi"')
    p = load("demo", sets).preset
    model = build.build_model(p).eval()
    plain = build.build_model(load("demo", sets[1:]).preset).eval()
    c_in = sum(p.channels())
    x, t = torch.rand(2, c_in, 16, 16), torch.tensor([10.0, 500.0])
    omega = Op(2, pattern=3).encode().expand(2, -1)
    with torch.no_grad():
        for prm in plain.parameters():  # wake the zero-initialised layers up (output and modulations)
            prm.add_(0.1 * torch.randn_like(prm))
    model.model.load_state_dict(plain.state_dict())
    assert torch.allclose(model(x, t), plain(x, t), atol=1e-6)  # zero-initialised MLP: identity at start
    assert torch.allclose(model(x, t, omega=omega), plain(x, t), atol=1e-6)
    torch.nn.init.normal_(model.omega_embed.mlp[-1].weight)
    assert torch.allclose(model(x, t), model(x, t, omega=torch.zeros(OMEGA_DIM)), atol=1e-6)  # None = identity
    assert not torch.allclose(model(x, t, omega=omega), model(x, t), atol=1e-4)  # omega reaches the output
    flagged = build.build_model(load("demo", sets + ["compat.scoreaug_identity_flag=true"]).preset)
    assert flagged.identity(1, "cpu")[0].nonzero().flatten().tolist() == [0]


def test_sda_shift_and_condition():
    from medgen_cli.diffusion import build_strategy

    rf = build_strategy("rflow", num_train_timesteps=100, continuous=False)
    t = torch.tensor([0.01, 0.5, 0.95])
    assert torch.allclose(sda.shifted_times(rf, t, 0.1), torch.tensor([0.11, 0.6, 1.0]))
    assert torch.allclose(sda.shifted_times(rf, t, 0.1, clamp_bug=True), torch.full((3,), 0.01))  # t = 1/T
    dd = build_strategy("ddpm", num_train_timesteps=100)
    assert torch.allclose(sda.shifted_times(dd, torch.tensor([0.5, 0.95]), 0.05), torch.tensor([0.55, 0.99]))
    draws = [sda.draw(1, s, 0.5, 3) for s in range(200)]
    assert 70 < sum(d is None for d in draws) < 130 and ("dflip", 0) in draws
    assert all(d != ("dflip", 0) for d in (sda.draw(1, s, 1.0, 2) for s in range(100)))
    image, cond = torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    cond[..., :2, :] = 1  # top rows
    seen = {}
    net = lambda inp, t: seen.setdefault("c", inp[:, 1:])  # noqa: E731
    sda.branch(net, rf, image, cond, torch.tensor([0.5]), torch.rand(1, 1, 8, 8), ("vflip", 0), 0.1, False, False)
    assert torch.equal(seen.pop("c"), cond.flip(-2))  # intended: the mask moves with the image
    sda.branch(net, rf, image, cond, torch.tensor([0.5]), torch.rand(1, 1, 8, 8), ("vflip", 0), 0.1, False, True)
    assert torch.equal(seen.pop("c"), cond)  # compat: the reference's unrotated mask


@pytest.mark.parametrize("dims", [2, 3])
def test_regional_weights_follow_rano_classes(dims):
    size = 32  # 240 mm field of view: 7.5 mm per pixel
    m = torch.zeros((1, 1, size, size) if dims == 2 else (1, 1, 4, size, size))
    m[..., 2:3, 2:3] = 1  # one pixel: 0 mm → tiny
    m[..., 10:12, 10:12] = 1  # diagonal 10.6 mm → small
    m[..., 20:24, 2:3] = 1  # 3 x 7.5 = 22.5 mm → medium
    m[..., 2:8, 20:26] = 1  # diagonal 53 mm → large
    w = tricks.regional_weight_map(m, load("demo", ["train.regional_weighting={}"]).preset.train
                                   .regional_weighting.model_dump())
    sl = (0, 0, 0) if dims == 3 else (0, 0)
    assert w.shape == m.shape
    assert w[sl][2, 2] == 2.5 and w[sl][10, 10] == 1.8 and w[sl][21, 2] == 1.4 and w[sl][5, 22] == 1.2
    assert w[sl][0, 0] == 1.0 and (w[m == 0] == 1.0).all()


def test_weighted_and_bf16_mse():
    pred, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    plain = tricks.weighted_mse(pred, target)
    assert torch.allclose(plain, ((pred - target) ** 2).mean())
    pw = torch.ones_like(pred) * 2
    assert torch.allclose(tricks.weighted_mse(pred, target, pixel_weight=pw), 2 * plain)
    b = tricks.weighted_mse(pred, target, bf16=True)
    assert b.dtype == torch.float32 and b != plain and abs(float(b - plain)) < 1e-2 * float(plain)


def test_config_rules():
    for sets, reason in ((["train.scoreaug={}", "train.sda={}"], "mutually exclusive"),
                         (["compat.sda_shift_clamp_bug=true"], "compat.sda_* options need train.sda"),
                         (['train.self_conditioning="consistency"'], "deterministic UNet"),
                         (["train.scoreaug={}", 'space={kind="s2d"}', "data.dims=3", "data.image_size=32",
                           "data.pad_depth_to=160"], "act on pixels")):
        with pytest.raises(ConfigError) as e:
            load("demo", sets)
        assert reason in "\n".join(e.value.lines()), sets


def _weights(tiny_preset, tmp_path, dims, sets, steps=2):
    p = load(str(tiny_preset(dims)), ["train.warmup_epochs=0", "train.epochs=50", "train.batch_size=2",
                                      "data.depth=8", "data.pad_depth_to=8", *sets]).preset
    ds = RandomPairs(dims)
    tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path, build.config_json(p),
                 torch.device("cpu"))
    for image, cond in tr._batches(0):
        if tr.state.step == steps:
            break
        tr._step(image, cond)
    return {k.removeprefix("model."): v.clone() for k, v in tr.model.state_dict().items() if "omega" not in k}


@pytest.mark.parametrize("dims", [2, 3])
def test_options_change_training(tiny_preset, tmp_path, dims):
    base = _weights(tiny_preset, tmp_path / "base", dims, [])
    options = {"scoreaug": ['train.scoreaug={mode="compose", compose_prob=1.0}'], "sda": ["train.sda={prob=1.0}"],
               "sda-compat": ["train.sda={prob=1.0}", "compat.sda_shift_clamp_bug=true"],
               "regional": ["train.regional_weighting={}"], "bf16-loss": ["compat.bf16_loss=true"]}
    if dims == 3:
        options = {k: options[k] for k in ("scoreaug", "sda", "regional")}
    results = {}
    for name, sets in options.items():
        w = _weights(tiny_preset, tmp_path / name, dims, sets)
        assert max((w[k] - base[k]).abs().max().item() for k in base) > 1e-7, name
        results[name] = w
    if "sda-compat" in results:  # the clamp bug trains the branch elsewhere than the intended shift
        assert max((results["sda"][k] - results["sda-compat"][k]).abs().max().item() for k in base) > 1e-7


def test_train_resume_and_sample_with_scoreaug(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    r = cli("train", "--preset", tiny_preset(3), "--data", phantom_root, "--run-dir", run, "--max-steps", 1,
            "--set", 'train.scoreaug={mode="compose", compose_prob=1.0}', "--set", "train.preview_every=0",
            "--set", "train.regional_weighting={}")
    assert r.code == 0, r.err
    idx = json.loads(next((run / "ckpt").glob("step-*/model.safetensors.index.json")).read_text())
    assert any("omega_embed" in k for k in idx["weight_map"])
    r = cli("train", "--resume", "--run-dir", run, "--max-steps", 2)
    assert r.code == 0, r.err
    r = cli("sample", "--run", run, "--data", phantom_root, "--out", tmp_path / "s", "--n", 1, "--steps", 2, "--json")
    assert r.code == 0, r.err


@pytest.mark.slow
def test_compile_trains(tiny_preset, tmp_path):
    """train.compile: the compiled network gives the eager loss and trains."""
    losses = {}
    for flag in ("false", "true"):
        p = load(str(tiny_preset(2)), ["train.warmup_epochs=0", "train.batch_size=2", f"train.compile={flag}"]).preset
        ds = RandomPairs(2)
        tr = Trainer(build.build_model(p), build.build_strategy(p), ds, ds, p.train, tmp_path / flag,
                     build.config_json(p), torch.device("cpu"))
        assert (tr.net is not tr.model) == (flag == "true")
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        image, cond = next(iter(tr._batches(0)))
        losses[flag] = float(tr._step(image, cond)["loss"])
        assert any(not torch.equal(v, before[k]) for k, v in tr.model.state_dict().items())
    assert math.isclose(losses["true"], losses["false"], rel_tol=1e-4)
