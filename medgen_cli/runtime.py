"""Where and how computation runs: device, precision, counter-based randomness, signals, memory.

Randomness (CONTRACTS.md "Randomness"). Every random draw that matters for results comes from a
``torch.Generator`` seeded by :func:`keyed_seed` of a tuple of integers, e.g. ``(seed, step, index,
stream)`` in training and ``(seed, index)`` in sampling. No global RNG is consulted, so the draw for a
given key does not depend on batch composition, resume point or data-parallel rank.

:func:`rand_keyed` draws on the CPU (a few numbers). :func:`randn_keyed` draws each sample on the
target device with a generator of that device: a CUDA generator gives a different (equally keyed)
stream from a CPU one, so CPU and GPU runs differ in their noise while every run on one device type
is reproducible whatever the batch, rank or resume point. Drawing 10.5 M normals per 256×256×160
sample on the CPU and copying them cost 0.1 s of a 0.53 s H200 training step (benchmarks/NOTES.md).

Everything here is a leaf below the other torch modules (ARCHITECTURE.md "Dependency direction").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import os
import signal
import sys
import threading

import torch

from .errors import ConfigError, ResourceError, UsageError, did_you_mean

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, the splitmix64 increment


# --------------------------------------------------------------------------- counter-based randomness


def _mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit integers with good avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _check_key(key) -> int:
    """A key must be a plain non-negative integer below 2**64 (bool is refused: it is a mistake)."""
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"keyed_seed keys must be int, got {type(key).__name__} {key!r}")
    if not 0 <= key <= _MASK64:
        raise ValueError(f"keyed_seed keys must be in [0, 2**64), got {key}")
    return key


def keyed_seed(*keys: int) -> int:
    """Mix a sequence of non-negative integers into one 63-bit seed (splitmix64 chaining).

    The state starts as ``mix64(golden · (len + 1))`` (so ``(1,)`` and ``(1, 0)`` differ), then absorbs
    each key as ``state = mix64((state + golden) xor key)`` (a bijection in the key, so two keys that
    differ in one position never collide before the final 63-bit truncation). Pure Python integers: the result
    is the same in every process and on every platform (``hash()`` is never used).
    """
    state = _mix64((_GOLDEN * (len(keys) + 1)) & _MASK64)
    for key in keys:
        state = _mix64(((state + _GOLDEN) & _MASK64) ^ _check_key(key))
    return state >> 1  # 63 bits: fits torch's signed 64-bit seed


def keyed_generator(*keys: int, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``keyed_seed(*keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(keyed_seed(*keys))
    return gen


@contextlib.contextmanager
def seeded(*keys: int):
    """Run a block that uses torch's global CPU RNG (model construction: ``nn.Module`` initialisers draw
    from it) with that RNG seeded by ``keyed_seed(*keys)``; the previous global state is restored
    afterwards, so nothing outside the block depends on it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(keyed_seed(*keys))
        yield


def randn_keyed(shape, keys, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise ``(B, *shape)``; sample ``i`` comes from its own generator ``keys[i]``.

    Drawn in float32 on ``device`` (see the module docstring), then cast to ``dtype``; sample ``i``
    is the same whatever else is in the batch.
    """
    dev = torch.device(device)
    draws = [torch.randn(tuple(shape), generator=keyed_generator(*k, device=dev), device=dev)
             for k in keys]  # B × shape
    if not draws:
        return torch.empty((0, *shape), device=dev, dtype=dtype)
    return torch.stack(draws).to(dtype=dtype)  # (B, *shape)


def rand_keyed(keys, device="cpu") -> torch.Tensor:
    """Uniform draws in the open interval (0, 1), one per key: float32 ``(B,)``.

    ``torch.rand`` gives multiples of 2**-24 in [0, 1 - 2**-24]; an exact 0 (probability 2**-24) is
    replaced by 2**-25 so that logit/log transforms never see 0 or 1. Drawn on the CPU like
    :func:`randn_keyed`.
    """
    draws = [torch.rand((), generator=keyed_generator(*k)) for k in keys]
    u = torch.stack(draws) if draws else torch.empty(0)  # (B,)
    u = torch.where(u > 0, u, torch.full_like(u, 2.0**-25))
    return to_device(u, device)


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)`` without a host sync when a CPU tensor goes to a GPU.

    A blocking copy from pageable memory waits for all queued GPU work, so one inside a training step
    keeps the host from queueing the next step while the GPU runs this one (the GPU then idles while the
    host launches). From pinned memory the copy is queued like a kernel; PyTorch holds the pinned block
    until the copy has run. Used for the small per-step tensors drawn or built on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)  # (inside torch.compile: traced as an ordinary copy, as before)


# --------------------------------------------------------------------------- device and precision

_DEVICE_HINT = "run on a GPU node, or pass --device cpu (or auto) to run on the CPU"


def _cuda_device(pref: str) -> torch.device:
    """``cuda`` / ``cuda:N`` after checking that such a GPU exists (else exit 5)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ResourceError(f"device '{pref}' requested but no CUDA GPU is visible", "--device",
                            hint=_DEVICE_HINT)
    dev = torch.device(pref)
    if dev.index is not None and dev.index >= count:
        raise ResourceError(f"device '{pref}' requested but only {count} GPU(s) are visible "
                            f"(cuda:0..cuda:{count - 1})", "--device", hint="pick an existing GPU index")
    return dev


def pick_device(pref: str = "auto") -> torch.device:
    """Resolve ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` to a ``torch.device``.

    ``auto`` takes the first GPU when one is visible, else the CPU. Asking for a GPU that is not
    there is a ResourceError (exit 5); an unknown name is a UsageError (exit 2).
    """
    pref = str(pref).strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or (pref.startswith("cuda:") and pref[5:].isdigit()):
        return _cuda_device(pref)
    raise UsageError(f"unknown device '{pref}', expected auto, cpu, cuda or cuda:N", "--device",
                     hint=did_you_mean(pref, ["auto", "cpu", "cuda"]) or "use auto, cpu, cuda or cuda:0")


def autocast(device, precision: str = "fp32"):
    """A context manager for the forward pass at ``precision`` (``bf16`` | ``fp32``).

    ``bf16`` is bfloat16 autocast on CUDA. On the CPU, and for ``fp32`` everywhere, it is a
    ``nullcontext`` (plain fp32): CPU bf16 autocast is slow and only used for smoke runs here.
    """
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"unknown precision '{precision}', expected bf16 or fp32", "precision",
                          hint=did_you_mean(precision, ["bf16", "fp32"]) or "use bf16 or fp32")
    if precision == "bf16" and _autocast_override is not None:  # the memory planner's simulated GPU step
        return _autocast_override()
    dev = torch.device(device)
    if precision == "bf16" and dev.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# engine/planner.py sets this while it runs a training step on fake CPU tensors: a factory of the context
# that reproduces CUDA bf16 autocast there (so the simulated step saves what the GPU step would save).
_autocast_override = None


def set_deterministic() -> None:
    """Ask torch for deterministic kernels (same numbers run to run on one machine).

    ``warn_only=True``: an op without a deterministic implementation warns instead of failing. cuBLAS
    needs a fixed workspace for determinism, so ``CUBLAS_WORKSPACE_CONFIG`` is set unless the user set
    it. Thread counts are left alone (CPU kernels here are deterministic for a given thread count).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def memory_peak(device) -> int:
    """Peak memory in bytes: CUDA ``max_memory_allocated`` on a GPU, the process's max RSS on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    import resource  # POSIX only; imported here so that the module imports everywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


# --------------------------------------------------------------------------- signals


def _stop_signals() -> list[signal.Signals]:
    names = ("SIGTERM", "SIGUSR1", "SIGINT")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


class StopSignals:
    """Turn SIGTERM / SIGUSR1 / SIGINT into a request to stop at the next safe point.

    Inside ``with StopSignals() as stop:`` a signal sets ``stop.requested`` to its name (e.g.
    ``"SIGUSR1"``, what SLURM sends before the wall time) instead of killing the process; the loop
    checks it, saves, and raises ``Interrupted``. A second SIGINT while a stop is pending raises
    ``KeyboardInterrupt`` so that an impatient Ctrl-C still works. Previous handlers are restored on
    exit. Python only lets the main thread install handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()


# --------------------------------------------------------------------------- data parallel (torchrun)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device_pref: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/LOCAL_RANK), else a world of one.

    NCCL on GPUs (one per local rank), gloo on the CPU. Returns the world and this rank's device.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), pick_device(device_pref)
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    dev = pick_device(device_pref)
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, dev


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool, world: World, device) -> bool:
    """True when `flag` is true on any rank (so every rank stops at the same step)."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def persistent_compile_cache() -> str | None:
    """Keep torch.compile's artefacts (Inductor's graph and kernel caches) in ``inductor/`` under medgen's
    cache folder ($MEDGEN_CACHE, else ~/.cache/medgen) instead of /tmp, which cluster nodes often wipe
    between jobs: a resumed or chained run then compiles from the cache (on the CPU here: a first
    compiled step of 107 s took 5.4 s). A $TORCHINDUCTOR_CACHE_DIR of the user's is kept (Inductor
    writes its /tmp default there itself once imported, so that value counts as unset); a folder that
    cannot be created leaves torch's default. Call before compiling; returns the folder in use."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default
    except ImportError:  # another torch layout: only an unset variable is ours to set
        inductor_default = None
    if current is not None and (inductor_default is None
                                or os.path.abspath(current) != os.path.abspath(inductor_default())):
        return current
    from .data.cache import default_cache_dir

    folder = default_cache_dir() / "inductor"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return current
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return str(folder)


class LaggedVote:
    """``any_rank`` for a per-step flag without stalling the host on the GPU every step.

    Each call starts an all-reduce (MAX) of this step's flag, queued behind the step's GPU work, and
    answers with the previous call's result, which waits only for the previous step to finish; so
    every rank gets the same answer, one step after the flag was raised (a stop signal at step s stops
    every rank after step s + 1). A world of one answers with the flag itself.
    """

    def __init__(self, world: World, device):
        self.world, self.device = world, torch.device(device)
        self._pending = None  # (host tensor, CUDA event or None) of the last call's vote

    def __call__(self, flag: bool) -> bool:
        if self.world.size == 1:
            return flag
        import torch.distributed as dist

        t = torch.full((1,), 1.0 if flag else 0.0, device=self.device)  # a fill, not a synchronous copy
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        event = None
        if self.device.type == "cuda":
            t = t.to("cpu", non_blocking=True)  # into pinned memory, ready when the event is
            event = torch.cuda.Event()
            event.record()
        previous, self._pending = self._pending, (t, event)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()
        return bool(previous[0].item() > 0)


def broadcast_float(value: float, world: World, device) -> float:
    """Rank 0's value on every rank (e.g. an LR scale decided from rank 0's validation)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())
