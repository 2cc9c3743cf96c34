"""DiffRS (issue 4): head size, rejection with an oracle head, NFE counting, lightweight variant, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from medgen_cli.diffusion import build_strategy
from medgen_cli.engine.diffrs import Evaluator, Options, rejection_sample, warm_up


def test_head_has_the_reference_size_in_3d():
    from medgen_cli.config import load
    from medgen_cli.jobs import build
    from medgen_cli.models.diffrs import build_head

    with torch.device("meta"):
        head = build_head(build.build_model(load("3d-pixel-256-diffrs").preset))
    assert abs(sum(p.numel() for p in head.parameters()) - 0.95e6) < 0.01e6


class Zero(torch.nn.Module):
    """A velocity net predicting v = 0 (x stays put): the output is the last accepted state."""

    def forward(self, x, t):
        return torch.zeros_like(x[:, :1])


class Oracle(torch.nn.Module):
    """Logit ≈ log-ratio of a "real" distribution with negative mean: rejects positive-mean samples."""

    def forward(self, x, t):
        return -8.0 * torch.sigmoid(8.0 * x[:, :1].flatten(1).mean(1))


def _run(backsteps, keys, steps=4, max_iter=None):
    strategy = build_strategy("rflow")
    ts = strategy.time_grid(steps, 1.0)
    ev = Evaluator(strategy, Zero(), Oracle())
    cond = torch.zeros(len(keys), 0, 4, 4)
    opts = Options(gamma=0.75, warmup=16, backsteps=backsteps, max_iter=max_iter)
    thr = warm_up(ev, ts, cond[:1].expand(16, 0, 4, 4), (1, 4, 4), 5, opts, 8)
    calls = (ev.calls_velocity, ev.calls_head)
    res = rejection_sample(ev, ts, cond, (1, 4, 4), keys, thr, opts)
    return res, ev, calls, thr, strategy, ts


@pytest.mark.parametrize("backsteps", [0, 1])
def test_oracle_head_moves_the_distribution_and_nfe_is_counted(backsteps):
    keys = [(3, i) for i in range(48)]
    res, ev, (v0, h0), thr, *_ = _run(backsteps, keys)
    assert thr.nfe == v0 + h0 == 16 * 4 + 16 * 5  # warm-up: 4 velocity + 5 head passes per trajectory
    means = res.x.flatten(1).mean(1)
    plain = torch.stack([torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(48)])
    assert (means > 0).float().mean() < 0.35 < (plain.flatten(1).mean(1) > 0).float().mean()
    assert sum(res.nfe) == ev.calls_velocity - v0 + ev.calls_head - h0  # NFE equals the counter
    assert all(n == a + b for n, a, b in zip(res.nfe, res.nfe_velocity, res.nfe_head))
    assert max(res.attempts) > 1  # some initial noise was redrawn
    if backsteps == 0:  # lightweight: a plain 4-step Euler walk after the initial-noise rejection
        assert res.nfe_velocity == [4] * 48 and res.nfe_head == [a for a in res.attempts]
        assert sum(res.backsteps) == 0
    else:
        assert sum(res.backsteps) > 0


def test_lightweight_only_redraws_the_initial_noise():
    from medgen_cli.engine.diffrs import STREAM_INIT
    from medgen_cli.runtime import randn_keyed

    keys = [(3, i) for i in range(8)]
    res, *_ = _run(0, keys)
    for i, (seed, idx) in enumerate(keys):  # v = 0: the output is the accepted initial noise itself
        want = randn_keyed((1, 4, 4), [(seed, STREAM_INIT, idx, res.attempts[i] - 1)])[0]
        assert torch.equal(res.x[i], want)


def test_batch_size_never_changes_a_sample_and_the_budget_terminates():
    keys = [(3, i) for i in range(6)]
    full, *_ = _run(1, keys)
    parts = [_run(1, keys[s:s + 2])[0] for s in (0, 2, 4)]
    assert torch.equal(full.x, torch.cat([p.x for p in parts]))
    assert full.nfe == sum((p.nfe for p in parts), [])
    tight, *_ = _run(1, keys, max_iter=3)  # a budget below one trajectory: re-initialised, then plain
    assert all(tight.forced) and all(n >= 4 for n in tight.nfe_velocity)


@pytest.mark.parametrize("dims", [2, 3])
def test_head_trains_resumes_and_samples(cli, tiny_preset, phantom_root, tmp_path, dims):
    quiet = ["--set", "train.preview_every=0", "--set", "train.val_max_items=1"]
    run = tmp_path / "model"
    r = cli("train", "--preset", tiny_preset(dims, "bravo"), "--data", phantom_root, "--run-dir", run,
            "--max-steps", 1, *quiet)
    assert r.code == 0, r.err
    fake = tmp_path / "fake"
    paired = ["--paired"] if dims == 2 else []  # 2D: slices written as a dataset (OUT/train/<i>/…)
    r = cli("sample", "--run", run, "--data", phantom_root, "--split", "train", "--n", 2, "--steps", 2, "--out", fake,
            *paired)
    assert r.code == 0, r.err
    head_preset = tmp_path / "head.toml"
    head_preset.write_text(tiny_preset(dims, "bravo").read_text().replace("lr = 1e-3", "lr = 3e-4")
                           + f'[diffrs]\nenabled = true\nrun = "{run}"\nfake = "{fake}"\nfake_val = "{fake}"\n')
    head = tmp_path / "head"
    r = cli("train", "--preset", head_preset, "--data", phantom_root, "--run-dir", head, "--max-steps", 2, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[-1])["step"] == 2
    cfg = json.loads((head / "config.json").read_text())["preset"]["diffrs"]
    assert cfg["sha256"] and cfg["checkpoint"]
    r = cli("train", "--resume", "--run-dir", head, "--max-steps", 3)
    assert r.code == 0, r.err
    recs = [json.loads(x) for x in (head / "metrics.jsonl").read_text().splitlines()]
    assert any(x["kind"] == "val" for x in recs) and max(x["step"] for x in recs) == 3
    r = cli("sample", "--run", run, "--data", phantom_root, "--out", tmp_path / "s", "--n", 2, "--steps", 2,
            "--diffrs", head, "--diffrs-warmup", 2, "--diffrs-backsteps", 1, "--json")
    assert r.code == 0, r.err
    rec = json.loads(r.out.splitlines()[0])
    assert rec["nfe"] == rec["nfe_velocity"] + rec["nfe_head"] and rec["nfe_velocity"] >= 2
    assert rec["diffrs_warmup_nfe"] == 2 * (2 + 3)
    assert cli("sample", "--run", run, "--out", tmp_path / "x", "--diffrs-gamma", 0.5).code == 2
    assert cli("sample", "--run", run, "--data", phantom_root, "--out", tmp_path / "y", "--diffrs", head,
               "--cfg", 2).code == 2
