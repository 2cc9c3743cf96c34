"""Generation modes and conditioning: dual, multi, seg_conditioned(_input); condition dropout and CFG;
zero-initialised time-embedding wrappers; late injection; homogeneous multi batches; exact resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medgen_cli.config.schema import TrainConfig
from medgen_cli.engine.trainer import State, Trainer
from medgen_cli.models import build_unet
from medgen_cli.models.conditioning import ConditionedUNet, wrap
from medgen_cli.runtime import World

SEG_SIZE = ["--set", "data.image_size=32"]  # 2D seg modes: the 10-pixel tumour rule needs 32 px phantoms


@pytest.mark.parametrize("dims, mode", [(2, "dual"), (2, "multi"), (2, "seg_conditioned"), (2, "seg_conditioned_input"),
                                        (3, "dual"), (3, "seg_conditioned"), (3, "seg_conditioned_input")])
def test_mode_trains_and_samples(cli, tiny_preset, phantom_root, tmp_path, dims, mode):
    extra = SEG_SIZE if dims == 2 and mode.startswith("seg") else []
    run = tmp_path / "run"
    r = cli("train", "--preset", tiny_preset(dims, mode), "--data", phantom_root, "--run-dir", run, "--max-steps", 2,
            "--set", "train.cond_dropout=0.5", "--set", "train.preview_every=0", *extra)
    assert r.code == 0, r.err
    args = ["sample", "--run", run, "--data", phantom_root, "--out", tmp_path / "s", "--n", 1, "--steps", 2,
            "--cfg", 2.0, "--json"]
    if mode == "multi":
        args += ["--modality", "flair"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert "without condition dropout" not in r.err  # cond_dropout > 0: CFG has a trained branch
    recs = [json.loads(line) for line in r.out.splitlines()]
    want = {"dual": ["t1_pre", "t1_gd"], "multi": ["flair"]}.get(mode, ["seg"])
    assert [rec["modality"] for rec in recs] == want and recs[0]["cfg_batched"]
    for rec in recs:
        assert (tmp_path / "s" / "00000" / f"{rec['modality']}.nii.gz").is_file()
    if mode.startswith("seg_"):
        assert len(recs[0]["bins"]) == 7 and recs[0]["condition"]
        r = cli("sample", "--run", run, "--out", tmp_path / "b", "--n", 1, "--steps", 1, "--bins", "1,0,2,0,0,0,0",
                "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out.splitlines()[0])["bins"] == [1, 0, 2, 0, 0, 0, 0]


def test_bad_bins_and_modality_are_usage_errors(cli, tiny_preset, phantom_root, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--preset", tiny_preset(2, "seg_conditioned"), "--data", phantom_root, "--run-dir", run,
               "--max-steps", 1, *SEG_SIZE).code == 0
    assert cli("sample", "--run", run, "--out", tmp_path / "a", "--bins", "1,2").code == 2
    assert cli("sample", "--run", run, "--out", tmp_path / "b", "--bins", "1,0,0,0,0,0,0", "--modality", "t1_gd").code == 2


# ---- condition dropout and CFG --------------------------------------------------------------------
def _trainer(model=None, **cfg) -> Trainer:
    tr = object.__new__(Trainer)
    tr.cfg, tr.state, tr.world, tr.device = TrainConfig(**cfg), State(step=5), World(), torch.device("cpu")
    tr.local_batch, tr.model = tr.cfg.batch_size, model or torch.nn.Identity()
    return tr


def test_condition_dropout_zeroes_whole_samples_keyed():
    cond = torch.rand(64, 3, 4, 4) + 0.1
    tr = _trainer(cond_dropout=0.3, seed=1, batch_size=64)
    out = tr._condition(cond)
    dropped = out.flatten(1).abs().sum(1) == 0
    assert 5 < int(dropped.sum()) < 40  # about 30 %
    assert torch.equal(out[~dropped], cond[~dropped])  # the others are untouched
    assert torch.equal(tr._condition(cond), out)  # keyed: the same draws again
    small = _trainer(cond_dropout=0.3, seed=1, batch_size=64)
    assert torch.equal(small._condition(cond[:16]), out[:16])  # keyed by global sample index, not batch
    tr.state.step = 6
    assert not torch.equal(tr._condition(cond), out)
    assert torch.equal(_trainer(seed=1)._condition(cond), cond)  # default 0.0: nothing dropped


def test_cfg_unconditional_branch_is_the_dropped_condition():
    from medgen_cli.diffusion import build_strategy
    from medgen_cli.engine.sampling import Guidance, Plan, sample_batch

    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, t):
            seen.append(x[:, 1:].clone())
            return x[:, :1] * 0.1

    cond = torch.rand(2, 7, 8, 8) + 0.1
    sample_batch(Net(), build_strategy("rflow"), torch.randn(2, 1, 8, 8), cond,
                 Plan(steps=2, guidance=Guidance(2.0)))
    dropped = _trainer(cond_dropout=0.999999, seed=0, batch_size=2)._condition(cond)
    assert torch.equal(seen[0][:2], cond) and torch.equal(seen[0][2:], dropped)


def test_mode_dropout_strategy_zeroes_whole_batch_vector():
    model = wrap(build_unet(2, 2, 1, [8, 16], [False, True], 1, 8, 8), "multi", [8, 16], "dropout", 0.5)
    cond = torch.rand(4, 5, 8, 8) + 0.1
    outs = []
    for step in range(12):
        tr = _trainer(model, seed=3, batch_size=4)
        tr.state.step = step
        outs.append(tr._condition(cond))
    zeroed = [bool((o[:, 1:] == 0).all()) for o in outs]
    assert any(zeroed) and not all(zeroed)
    assert all(torch.equal(o[:, :1], cond[:, :1]) for o in outs)  # the mask channel is kept


# ---- wrappers: identity at start, learn after a step ----------------------------------------------------
def _unet(n_in, ch, attention):
    unet = build_unet(2, n_in, 1, ch, attention, 1, 8, 8)
    for p in unet.out.parameters():  # MONAI zero-initialises the output conv: make the output informative
        torch.nn.init.normal_(p, std=0.1)
    return unet


def _vec_input(x, values):
    maps = torch.as_tensor(values, dtype=torch.float32).reshape(len(values), -1, 1, 1).expand(-1, -1, *x.shape[2:])
    return torch.cat([x, maps], dim=1)


@pytest.mark.parametrize("mode, strategy, extra", [("multi", "full", {}), ("multi", "film", {}),
                                                   ("multi", "late", {"late_start_level": 1}),
                                                   ("seg_conditioned", "", {}),
                                                   ("seg_conditioned", "", {"size_bins": "film-improved"})])
def test_wrappers_start_as_identity_then_learn(mode, strategy, extra):
    torch.manual_seed(0)
    ch = [8, 16, 16]
    n_in, n_vec = (2, 4) if mode == "multi" else (1, 7)
    unet = _unet(n_in, ch, [False, False, True])
    model = wrap(unet, mode, ch, strategy or "full", **extra)
    assert isinstance(model, ConditionedUNet)
    x = torch.randn(2, n_in, 16, 16)
    t = torch.tensor([300.0, 700.0])
    v1 = [[1, 0, 0, 0], [0, 0, 1, 0]] if mode == "multi" else [[0.1, 0, 0.2, 0, 0, 0, 0], [0, 0, 0, 0.3, 0, 0, 0.1]]
    v2 = [[0, 1, 0, 0], [0, 0, 0, 1]] if mode == "multi" else [[0, 0, 0, 0, 0.5, 0, 0], [0.2, 0.1, 0, 0, 0, 0, 0]]
    with torch.no_grad():
        plain = unet(x, t)
        assert torch.equal(model(_vec_input(x, v1), t), plain)
        assert torch.equal(model(_vec_input(x, v2), t), plain)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # MONAI zero-inits each resblock's conv2, so the embedding path opens after a step
        opt.zero_grad()
        model(_vec_input(x, v1), t).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(_vec_input(x, v1), t), model(_vec_input(x, v2), t))


def test_none_strategy_ignores_the_mode():
    unet = _unet(2, [8, 16], [False, True])
    model = wrap(unet, "multi", [8, 16], "none")
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([10.0])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    with torch.no_grad():
        assert torch.equal(model(_vec_input(x, [[0, 1, 0, 0]]), t), unet(x, t))


@pytest.mark.parametrize("start", [1, 2])
def test_late_injects_from_its_start_level(start):
    torch.manual_seed(0)
    ch = [8, 16, 16]
    unet = _unet(2, ch, [False, False, True])
    model = wrap(unet, "multi", ch, "late", late_start_level=start)
    for lin in model.late.proj.values():
        torch.nn.init.normal_(lin.weight)
    seen = {}

    def hook(name):
        return lambda mod, args, kwargs: seen.setdefault(name, []).append(kwargs["hidden_states"].clone())

    for i, block in enumerate(unet.down_blocks):
        block.register_forward_pre_hook(hook(i), with_kwargs=True)
    unet.middle_block.register_forward_pre_hook(hook("mid"), with_kwargs=True)
    x, t = torch.randn(1, 2, 16, 16), torch.tensor([10.0])
    with torch.no_grad():
        plain = unet(x, t)
        late = model(_vec_input(x, [[0, 0, 1, 0]]), t)
    assert not torch.allclose(plain, late)
    for level in range(len(ch)):  # input of level L = output of level L-1: injected iff L-1 >= start
        same = torch.equal(seen[level][0], seen[level][1])
        assert same == (level - 1 < start), level
    assert not torch.equal(seen["mid"][0], seen["mid"][1])


# ---- homogeneous multi batches and exact resume -------------------------------------------------------
def test_multi_batches_are_homogeneous_and_keyed(phantom_root):
    from medgen_cli.data.datasets import SliceDataset

    ds = SliceDataset(phantom_root, "train", "multi", image_size=16)
    assert len(ds.groups()) == 4
    tr = _trainer(seed=11, batch_size=4)
    tr.train_ds, tr._groups = ds, ds.groups()
    tr.steps_per_epoch = sum(tr._group_batches(len(g)) for g in tr._groups)
    b0 = tr._epoch_batches(0)
    assert len(b0) == tr.steps_per_epoch
    for batch in b0:
        assert len({ds[i]["mode_id"] for i in batch}) == 1 and len(batch) == 4
    assert len({ds.modality_of(b[0]) for b in b0}) == 4
    assert tr._epoch_batches(0) == b0 and tr._epoch_batches(1) != b0
    assert len({i for b in b0 for i in b}) == sum(len(b) for b in b0)  # no repeats
    cond = ds[b0[0][0]]["cond"]
    assert cond.shape == (5, 16, 16) and cond[1 + ds[b0[0][0]]["mode_id"]].eq(1).all()


def test_exact_resume_with_multi_dropouts_and_dynamic_augmentation(cli, tiny_preset, phantom_root, tmp_path):
    from test_train import assert_identical, train

    preset = tiny_preset(2, "multi", extra='\n[conditioning]\nmode_embedding = "dropout"\nmode_dropout = 0.5\n')
    sets = ["--set", "train.cond_dropout=0.3", "--set", "data.augment=\"dynamic\"", "--set", "train.preview_every=0"]
    n = 6
    assert train(cli, preset, phantom_root, tmp_path / "full", "--max-steps", n, *sets).code == 0
    assert train(cli, preset, phantom_root, tmp_path / "half", "--max-steps", n // 2, *sets).code == 0
    r = cli("train", "--resume", "--run-dir", tmp_path / "half", "--max-steps", n)
    assert r.code == 0, r.err
    assert_identical(tmp_path / "full", tmp_path / "half")


def test_volume_bins_ignore_depth_padding(phantom_root):
    from medgen_cli.data.datasets import VolumeDataset
    from medgen_cli.data.sizebins import size_bins

    ds = VolumeDataset(phantom_root, "val", "seg_conditioned", image_size=16, pad_depth_to=24)
    it = ds[0]
    sx, sy, sz = ds.spacing_of(0)
    seg = it["image"][0, :ds.depth_of(0)].numpy()
    assert it["bins"].tolist() == size_bins(seg, (sz, sx, sy)).tolist()
    assert torch.allclose(it["cond"][:, 0, 0, 0], it["bins"].float() / 10)
    assert it["cond"].shape == (7, 24, 16, 16)


def test_mode_presets_validate_and_build_on_meta():
    import tomllib

    from medgen_cli.config import load, presets_dir
    from medgen_cli.jobs import build

    index = tomllib.loads((presets_dir() / "INDEX.toml").read_text())
    names = [e["preset"] for e in index["experiment"]
             if e["preset"].startswith(("2d-multi", "2d-pixel-128-aug", "2d-unet-", "3d-seg-cond", "3d-seg-input"))]
    assert len(names) >= 31
    expected = {"2d-unet-adm-128": 92.2e6, "2d-unet-tiny-128": 2.7e6, "2d-unet-iddpm-128": 122.4e6,
                "3d-seg-cond-improved-128": 271e6}
    for name in names:
        p = load(name, [], {}).preset
        n = build.count_parameters(p)
        if name in expected:
            assert abs(n - expected[name]) / expected[name] < 0.02, (name, n)
        text = (presets_dir() / f"{name}.toml").read_text()
        assert text.startswith("# ") and f"--preset {name}" in text and p.experiment
