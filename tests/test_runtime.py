"""Counter-based randomness, device/precision choice, stop signals, memory peak."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch

from medgen_cli import runtime as rt
from medgen_cli.errors import ConfigError, ResourceError, UsageError

# --------------------------------------------------------------------------- keyed randomness


def test_keyed_seed_is_deterministic_and_63_bit():
    seeds = [rt.keyed_seed(42, step, i) for step in range(50) for i in range(20)]
    assert seeds == [rt.keyed_seed(42, step, i) for step in range(50) for i in range(20)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)


def test_keyed_seed_golden_values():
    """Fixed numbers: any process, any platform, any PYTHONHASHSEED gives these (no hash())."""
    assert rt.keyed_seed() == 8147104208329303767
    assert rt.keyed_seed(0) == 2547805098422156800
    assert rt.keyed_seed(42, 7, 3) == 7876198090319152910
    assert rt.keyed_seed(2**64 - 1) == 4399922209440921945


def test_keyed_seed_is_sensitive_to_value_order_and_length():
    base = rt.keyed_seed(1, 2, 3)
    variants = [rt.keyed_seed(1, 2, 4), rt.keyed_seed(3, 2, 1), rt.keyed_seed(1, 2), rt.keyed_seed(1, 2, 3, 0),
                rt.keyed_seed(0, 1, 2, 3), rt.keyed_seed(2**64 - 1, 2, 3)]
    assert base not in variants and len(set(variants)) == len(variants)
    flips = bin(rt.keyed_seed(5, 0) ^ rt.keyed_seed(5, 1)).count("1")
    assert 16 < flips < 48  # avalanche: about half of the 63 bits change


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3"])
def test_keyed_seed_rejects_bad_keys(bad):
    with pytest.raises((TypeError, ValueError)):
        rt.keyed_seed(1, bad)


def test_keyed_generator_matches_manual_seed():
    gen = rt.keyed_generator(9, 9)
    ref = torch.Generator().manual_seed(rt.keyed_seed(9, 9))
    assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=ref))


def test_seeded_block_is_reproducible_and_restores_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with rt.seeded(7, 1):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    with rt.seeded(7, 1):
        b = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_next)


def test_randn_keyed_sample_does_not_depend_on_batch():
    keys = [(42, 10, i) for i in range(6)]
    full = rt.randn_keyed((2, 4, 4), keys, "cpu")  # (6, 2, 4, 4)
    part = rt.randn_keyed((2, 4, 4), [keys[4], keys[1]], "cpu")
    assert full.shape == (6, 2, 4, 4) and full.dtype == torch.float32
    assert torch.equal(part[0], full[4]) and torch.equal(part[1], full[1])
    assert not torch.equal(full[0], full[1])
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(rt.randn_keyed((2, 4, 4), keys, "cpu"), full)


def test_randn_keyed_3d_shape_and_dtype():
    noise = rt.randn_keyed((1, 3, 4, 4), [(1, 2)], "cpu", dtype=torch.bfloat16)
    assert noise.shape == (1, 1, 3, 4, 4) and noise.dtype == torch.bfloat16
    assert rt.randn_keyed((1, 4, 4), [], "cpu").shape == (0, 1, 4, 4)


def test_rand_keyed_open_interval_and_batch_independence():
    keys = [(3, i) for i in range(2000)]
    u = rt.rand_keyed(keys, "cpu")
    assert u.shape == (2000,) and u.dtype == torch.float32
    assert bool((u > 0).all() and (u < 1).all())
    assert torch.equal(rt.rand_keyed(keys[7:9], "cpu"), u[7:9])
    assert abs(float(u.mean()) - 0.5) < 0.03


# --------------------------------------------------------------------------- device and precision


def test_pick_device():
    assert rt.pick_device("cpu") == torch.device("cpu")
    assert rt.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError) as info:
        rt.pick_device("gpu")
    assert info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
@pytest.mark.parametrize("pref", ["cuda", "cuda:1"])
def test_pick_device_without_gpu_is_a_resource_error(pref):
    with pytest.raises(ResourceError) as info:
        rt.pick_device(pref)
    assert info.value.code == 5 and "no CUDA GPU" in info.value.what and info.value.hint


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_on_cpu_is_plain_fp32():
    for precision in ("bf16", "fp32"):
        with rt.autocast("cpu", precision):
            out = torch.nn.Linear(3, 2)(torch.randn(4, 3))
        assert out.dtype == torch.float32
    assert isinstance(rt.autocast("cuda", "fp32"), contextlib.nullcontext)
    assert isinstance(rt.autocast("cuda", "bf16"), torch.autocast)
    with pytest.raises(ConfigError) as info:
        rt.autocast("cpu", "fp16")
    assert info.value.code == 3


def test_set_deterministic_leaves_threads_alone():
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    try:
        rt.set_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == threads
    finally:
        torch.use_deterministic_algorithms(was)


def test_memory_peak_cpu():
    assert rt.memory_peak("cpu") > 10 * 2**20  # a Python process with torch uses more than 10 MiB


# --------------------------------------------------------------------------- signals


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_stop_signals_set_flag_and_restore_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with rt.StopSignals() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_second_sigint_still_interrupts():
    with rt.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_compile_cache_lives_beside_the_medgen_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "cache"))
    assert rt.persistent_compile_cache() == str(tmp_path / "cache" / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert (tmp_path / "cache" / "inductor").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert rt.persistent_compile_cache() == str(tmp_path / "mine"), "an explicit choice is kept"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.default_cache_dir", lambda: str(tmp_path / "tmp"))
    assert cache_dir() == str(tmp_path / "tmp")  # what Inductor does once imported: writes its default
    assert rt.persistent_compile_cache() == str(tmp_path / "cache" / "inductor"), "Inductor's default is not a choice"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MEDGEN_CACHE", str(tmp_path / "file"))  # cannot hold a folder
    assert rt.persistent_compile_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def _vote_rank(rank: int, store_file: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    vote = rt.LaggedVote(rt.World(rank, 2, rank), "cpu")
    out.put((rank, [vote(rank == 1 and call == 1) for call in range(4)]))
    dist.destroy_process_group()


def test_lagged_vote_agrees_one_step_late(tmp_path):
    """Rank 1 raises its flag at call 1: both ranks answer True at call 2 and only then."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_vote_rank, args=(r, str(tmp_path / "store"), out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == {0: [False, False, True, False], 1: [False, False, True, False]}
    assert rt.LaggedVote(rt.World(), "cpu")(True) is True  # a world of one: no lag


def test_stop_signals_outside_main_thread_install_nothing():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def work():
        with rt.StopSignals():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [before]


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_draws_device_and_precision():
    keys = [(42, 3, i) for i in range(4)]
    gpu = rt.randn_keyed((1, 8, 8), keys, "cuda")  # drawn on the GPU: keyed and batch-independent there
    assert gpu.device.type == "cuda" and torch.equal(gpu[2:3], rt.randn_keyed((1, 8, 8), keys[2:3], "cuda"))
    assert torch.equal(rt.rand_keyed(keys, "cuda").cpu(), rt.rand_keyed(keys, "cpu"))
    assert rt.pick_device("cuda") == torch.device("cuda") and rt.pick_device("auto").type == "cuda"
    with pytest.raises(ResourceError):
        rt.pick_device(f"cuda:{torch.cuda.device_count()}")
    layer = torch.nn.Linear(8, 8).cuda()
    with rt.autocast("cuda", "bf16"):
        assert layer(torch.randn(2, 8, device="cuda")).dtype == torch.bfloat16
    with rt.autocast("cuda", "fp32"):
        assert layer(torch.randn(2, 8, device="cuda")).dtype == torch.float32
    assert rt.memory_peak("cuda") > 0
