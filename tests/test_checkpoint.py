"""Sharded safetensors checkpoints: round trips, integrity, pointers, retention, resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from medgen_cli import checkpoint as ck
from medgen_cli.errors import InputError, UsageError

CONFIG = {"model": {"kind": "unet", "channels": [8, 16]}, "seed": 7}


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    head = list(model[2].parameters())
    opt = torch.optim.AdamW([{"params": list(model[0].parameters())},
                             {"params": head, "lr": 3e-4, "betas": (0.5, 0.9)}], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _ema_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() * 0.5 + 0.25 for k, v in model.state_dict().items()}


def _save(run, step, model=None, opt=None, ema=True, shard_bytes=ck.DEFAULT_SHARD_BYTES, state=None):
    model = model if model is not None else _model_and_optimizer(step)[0]
    groups = {"model": model.state_dict()}
    if ema:
        groups["ema"] = _ema_of(model)
    if opt is not None:
        groups["optimizer"] = opt.state_dict()
    return ck.save_checkpoint(run, step, epoch=step // 2, groups=groups, trainer_state=state or {},
                              config_json=json.dumps(CONFIG), shard_bytes=shard_bytes)


def _assert_same(a, b):
    """Exact structural equality: same types, same keys, tensors equal with equal dtype."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _assert_state(a: dict, b: dict):
    """Same tensor names (any order or mapping type), tensors bit-equal with the same dtype."""
    assert set(a) == set(b)
    for key in a:
        _assert_same(a[key], b[key])


def _first_shard(step_dir, group="model"):
    return sorted(step_dir.glob(f"{group}-*.safetensors"))[0]


# --------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(tmp_path):
    model, opt = _model_and_optimizer()
    rng = torch.get_rng_state()
    step_dir = _save(tmp_path, 12, model, opt, state={"rng": rng, "sched": {"last_epoch": 3}})
    assert step_dir == tmp_path / "ckpt" / "step-00000012"
    loaded = ck.load_checkpoint(tmp_path)
    assert (loaded.weights, loaded.step, loaded.epoch, loaded.config) == ("ema", 12, 6, CONFIG)
    _assert_state(loaded.model_state, _ema_of(model))
    _assert_state(ck.load_checkpoint(tmp_path, weights="raw").model_state, model.state_dict())
    _assert_same(ck.load_optimizer_state(step_dir, opt.state_dict()), opt.state_dict())
    assert torch.equal(loaded.trainer_state["rng"], rng) and loaded.trainer_state["sched"] == {"last_epoch": 3}
    assert set(loaded.groups) == {"model", "ema", "optimizer"}


def test_optimizer_state_loads_into_a_fresh_optimizer(tmp_path):
    model, opt = _model_and_optimizer()
    step_dir = _save(tmp_path, 1, model, opt)
    fresh_model, _ = _model_and_optimizer(seed=1)
    fresh_model.load_state_dict(ck.load_group(step_dir, "model"))
    fresh = torch.optim.AdamW([{"params": list(fresh_model[0].parameters())},
                               {"params": list(fresh_model[2].parameters())}])
    fresh.load_state_dict(ck.load_optimizer_state(step_dir, fresh.state_dict()))
    _assert_same(fresh.state_dict(), opt.state_dict())


def test_flatten_optimizer_keeps_types_and_dtypes():
    _, opt = _model_and_optimizer()
    sd = opt.state_dict()
    tensors, meta = ck.flatten_optimizer(sd)
    assert "state.0.exp_avg" in tensors and tensors["state.0.step"].dtype == sd["state"][0]["step"].dtype
    json.dumps(meta)  # the skeleton is plain JSON
    _assert_same(ck.unflatten_optimizer(tensors, json.loads(json.dumps(meta))), sd)


def test_optimizer_template_mismatch_is_refused(tmp_path):
    model, opt = _model_and_optimizer()
    step_dir = _save(tmp_path, 1, model, opt)
    other = torch.optim.AdamW(list(model.parameters()))  # one group of 4 instead of 2 groups of 2
    with pytest.raises(InputError, match=r"sizes \[2, 2\].*\[4\]"):
        ck.load_optimizer_state(step_dir, other.state_dict())


def test_multiple_shards_list_every_tensor(tmp_path):
    model, _ = _model_and_optimizer()
    step_dir = _save(tmp_path, 3, model, shard_bytes=64)
    index = json.loads((step_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in step_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["metadata"]["shards"]) == set(shards) == set(index["weight_map"].values())
    assert index["metadata"]["format"] == "medgen/1" and json.loads(index["metadata"]["config"]) == CONFIG
    with safe_open(str(step_dir / shards[0]), "pt") as f:
        assert f.metadata()["format"] == "medgen/1" and f.metadata()["step"] == "3"
    _assert_state(ck.load_group(step_dir, "model"), model.state_dict())


def test_tied_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "tied": base, "t": base.t(), "view": base[1]}
    step_dir = ck.save_checkpoint(tmp_path, 0, 0, {"model": tensors}, {}, "{}")
    _assert_state(ck.load_group(step_dir, "model"), {k: v.contiguous() for k, v in tensors.items()})


def test_ema_falls_back_to_raw_weights(tmp_path):
    model, _ = _model_and_optimizer()
    _save(tmp_path, 2, model, ema=False)
    loaded = ck.load_checkpoint(tmp_path, weights="ema")
    assert loaded.weights == "raw"
    _assert_state(loaded.model_state, model.state_dict())
    with pytest.raises(UsageError):
        ck.load_checkpoint(tmp_path, weights="best")


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 5, _model_and_optimizer(0)[0])
    model, _ = _model_and_optimizer(1)
    step_dir = _save(tmp_path, 5, model)
    _assert_state(ck.load_group(step_dir, "model"), model.state_dict())
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()] == ["step-00000005"]


def test_torch_load_is_never_called(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    model, opt = _model_and_optimizer()
    step_dir = _save(tmp_path, 1, model, opt, state={"rng": torch.get_rng_state()})
    ck.load_checkpoint(tmp_path)
    ck.load_optimizer_state(step_dir, opt.state_dict())
    ck.load_checkpoint(_first_shard(step_dir))


# --------------------------------------------------------------------------- integrity


def test_flipped_byte_is_refused_naming_the_shard(tmp_path):
    step_dir = _save(tmp_path, 1, shard_bytes=64)
    shard = sorted(step_dir.glob("ema-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ck.load_checkpoint(tmp_path, weights="raw")  # other groups are still fine
    with pytest.raises(InputError, match="checksum mismatch") as info:
        ck.load_checkpoint(tmp_path)
    assert shard.name in info.value.what and "altered or truncated" in info.value.what
    assert info.value.code == 4


def test_truncated_shard_is_refused_naming_the_shard(tmp_path):
    step_dir = _save(tmp_path, 1)
    shard = _first_shard(step_dir)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputError, match=shard.name) as info:
        ck.load_checkpoint(tmp_path, weights="raw")
    assert "truncated" in info.value.what


# --------------------------------------------------------------------------- resolution and pointers


def test_tmp_and_indexless_folders_are_never_used(tmp_path):
    good = _save(tmp_path, 1)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good, ckpt / ".tmp-deadbeef")  # a complete but never renamed save
    half = shutil.copytree(good, ckpt / "step-00000009")
    (half / "model.safetensors.index.json").unlink()
    (ckpt / "LATEST").unlink()
    assert ck.resolve_step_dir(tmp_path, "latest") == good
    assert ck.load_checkpoint(tmp_path).step == 1
    for bad in (half, ckpt / ".tmp-deadbeef"):
        with pytest.raises(InputError):
            ck.resolve_step_dir(bad)
    with pytest.raises(InputError, match="step-00000009"):
        ck.resolve_step_dir(tmp_path, "step-9")


def test_pointers_and_fallback(tmp_path):
    first, second, third = (_save(tmp_path, s) for s in (1, 2, 3))
    assert ck.read_pointer(tmp_path, "LATEST") == third and ck.read_pointer(tmp_path, "BEST") is None
    assert ck.resolve_step_dir(tmp_path) == third  # no BEST yet: LATEST
    ck.set_pointer(tmp_path, "BEST", first)
    assert ck.resolve_step_dir(tmp_path, "best") == first
    assert ck.resolve_step_dir(tmp_path, "latest") == third
    shutil.rmtree(first)  # BEST now broken → LATEST
    assert ck.read_pointer(tmp_path, "BEST") is None and ck.resolve_step_dir(tmp_path) == third
    (tmp_path / "ckpt" / "LATEST").write_text("../../etc\n")  # malformed → newest valid step
    assert ck.resolve_step_dir(tmp_path, "latest") == third
    shutil.rmtree(third)
    assert ck.resolve_step_dir(tmp_path) == second


def test_which_step_n(tmp_path):
    _save(tmp_path, 1)
    two = _save(tmp_path, 2)
    assert ck.resolve_step_dir(tmp_path, 2) == two
    assert ck.resolve_step_dir(tmp_path, "step-2") == two == ck.resolve_step_dir(tmp_path, "step-00000002")
    with pytest.raises(InputError, match="step-00000007") as info:
        ck.resolve_step_dir(tmp_path, "step-7")
    assert "step-00000001, step-00000002" in info.value.hint
    with pytest.raises(UsageError) as info:
        ck.resolve_step_dir(tmp_path, "lates")
    assert info.value.code == 2 and "latest" in info.value.hint


def test_resolve_run_step_ckpt_index_and_single_file(tmp_path):
    model, _ = _model_and_optimizer()
    step_dir = _save(tmp_path, 4, model)
    index = step_dir / "model.safetensors.index.json"
    for given in (tmp_path, tmp_path / "ckpt", step_dir, index):
        assert ck.resolve_step_dir(given) == step_dir
    single = _first_shard(step_dir)
    assert ck.resolve_step_dir(single) == single
    loaded = ck.load_checkpoint(single)
    assert (loaded.weights, loaded.step, loaded.config, loaded.groups) == ("raw", 4, CONFIG, ("model",))
    _assert_state(loaded.model_state, model.state_dict())


def test_one_shard_of_many_is_refused(tmp_path):
    step_dir = _save(tmp_path, 4, shard_bytes=64)
    with pytest.raises(InputError, match="one of"):
        ck.load_checkpoint(_first_shard(step_dir))


def test_no_checkpoint_message(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(InputError) as info:
        ck.load_checkpoint(run)
    err = info.value
    assert err.code == 4
    assert err.lines()[0] == f"error: no checkpoint in {run} ({run / 'ckpt'})"
    assert "config.json" in err.hint and f"medgen train --resume --run-dir {run}" in err.hint
    (run / "ckpt" / "step-00000003").mkdir(parents=True)
    with pytest.raises(InputError) as info:
        ck.resolve_step_dir(run)
    assert "step-00000003 (no valid index" in info.value.hint


def test_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        ck.resolve_step_dir(tmp_path / "nope")
    assert info.value.code == 4


# --------------------------------------------------------------------------- retention


def test_prune_keeps_last_three_plus_best_and_removes_temporaries(tmp_path):
    steps = [_save(tmp_path, s, ema=False) for s in range(1, 7)]
    ck.set_pointer(tmp_path, "BEST", steps[1])
    ckpt = tmp_path / "ckpt"
    (ckpt / ".tmp-crashed").mkdir()
    (ckpt / ".LATEST.tmp-0000").write_text("step-00000001\n")
    removed = ck.prune(tmp_path, keep_last=3)
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == ["BEST", "LATEST", "step-00000002", "step-00000004", "step-00000005", "step-00000006"]
    assert {p.name for p in removed} >= {"step-00000001", "step-00000003", ".tmp-crashed"}
    assert ck.resolve_step_dir(tmp_path) == steps[1]


def test_prune_with_fewer_steps_than_kept_removes_nothing(tmp_path):
    steps = [_save(tmp_path, s, ema=False) for s in (1, 2)]
    assert ck.prune(tmp_path, keep_last=3) == []
    assert ck.valid_step_dirs(tmp_path / "ckpt") == steps
    assert ck.prune(tmp_path / "missing") == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_save_from_and_load_to_gpu(tmp_path):
    model, _ = _model_and_optimizer()
    model.cuda()
    _save(tmp_path, 1, model)
    loaded = ck.load_checkpoint(tmp_path, weights="raw", device="cuda")
    assert all(t.is_cuda for t in loaded.model_state.values())
    _assert_state(loaded.model_state, model.state_dict())
