"""DiffRS (Na et al. 2024) adapted to rectified flow with Euler steps (SYSTEM.md §9): head training and
the rejection sampler.

Head training (``medgen train --preset …-diffrs``). Real items = the training split's images with their
masks; fake items = a ``medgen sample`` output folder (``diffrs.fake``: OUT/<i>/bravo.nii.gz with
seg.nii.gz beside it, read as a dataset split; or a ``--paired`` output, which 2D models need). Each item is forward-diffused to a logit-normal t with
fresh noise, both keyed by (seed, step, global sample index), and the head (models/diffrs.py) on the
frozen diffusion UNet's encoder learns real = 1 / fake = 0 with BCE-with-logits, AdamW (train.lr,
train.weight_decay; the preset: 3e-4, 1e-7), constant LR. Checkpoints hold only the head (group
"model") and its optimizer; the run's config points at the diffusion checkpoint (``diffrs.checkpoint``,
the step folder, and ``diffrs.sha256``, the sha256 of its model index). Resume is exact (keyed draws,
saved position). Validation (``diffrs.fake_val`` against data.val_split) reports BCE and accuracy.

Sampling (``medgen sample --diffrs HEAD_RUN``). On the Euler grid t_0 = 1 > … > t_N = 0:
1. Warm-up: ``warmup`` plain Euler trajectories (noise keyed (seed, STREAM_WARMUP, j), the conditions of
   the first outputs, cycled) give the logit ℓ_k at every grid time; thresholds A_k = γ-quantile of
   ℓ_k and B_k = γ-quantile of ℓ_k − ℓ_{k−1}.
2. Marginal rejection: initial noise (keyed (seed, STREAM_INIT, index, attempt)) is redrawn while
   ℓ_0 < A_0 + log u.
3. Backstep rejection (``backsteps`` ≥ 1) after each Euler step k → k+1: reject when
   ℓ_{k+1} < B_{k+1} + log u + ℓ_k, else when ℓ_{k+1} < A_{k+1} + log u (one u for both). On rejection,
   x̂₀ = x + t_{k+1}·v (v the velocity of the step just taken) is re-noised to t_{k+1−backsteps} with
   fresh noise (keyed (seed, STREAM_BACK, index, attempt, n)), and the walk continues from there with
   the logit recorded at that grid point as ℓ_prev.
4. NFE budget ``max_iter`` per trajectory: a sample that spends it is re-initialised from fresh
   initial noise and then finishes as plain Euler (no rejection), so every sample terminates.
``backsteps = 0`` is the lightweight variant: only step 2; the trajectory itself is plain Euler.
Every uniform u is keyed (seed, STREAM_U, index, draw counter of that sample), so a sample never
depends on the batch it is in.

NFE. ``nfe`` of a sample = its velocity evaluations (full UNet passes) + its head evaluations (each a
UNet encoder + middle-block pass plus the head), both counted at the network, per sample (a batched
call counts once for every sample in it). Records carry ``nfe_velocity`` and ``nfe_head`` apart; the
warm-up (shared by all samples of a command) is reported as ``diffrs_warmup_nfe``. No CFG (as the
reference).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..errors import ConfigError, Interrupted
from ..runtime import keyed_generator, rand_keyed, randn_keyed

log = logging.getLogger("medgen")

STREAM_SHUFFLE, STREAM_T, STREAM_NOISE, STREAM_VAL_T, STREAM_VAL_NOISE = 1, 2, 3, 4, 5
STREAM_WARMUP, STREAM_INIT, STREAM_U, STREAM_BACK = 0x44525331, 0x44525332, 0x44525333, 0x44525334


# ---- the frozen model and the head --------------------------------------------------------------
def _sha256(step_dir: Path) -> str:
    import hashlib

    p = Path(step_dir)
    index = p / "model.safetensors.index.json" if p.is_dir() else p
    return hashlib.sha256(index.read_bytes()).hexdigest()


def diffusion_model(ref: str, which: str, weights: str):
    """(checkpoint, validated diffusion preset, UNet with the checkpoint's weights)."""
    from ..config import validate
    from ..jobs import build

    ck = ckpt.load_checkpoint(Path(ref).expanduser(), which, weights)
    dp = validate(ck.config, where=str(ck.step_dir))
    if dp.model.kind != "unet" or dp.vector_channels() or dp.controlnet.stage or dp.space.kind != "pixel" \
            or dp.diffusion.kind != "rflow":
        raise ConfigError("DiffRS needs a plain rflow UNet in pixel space as the diffusion model", str(ck.step_dir),
                          "point diffrs.run at a bravo/dual rflow UNet run")
    model = build.build_model(dp)
    model.load_state_dict(ck.model_state)
    return ck, dp, model


def build_discriminator(unet, cfg):
    from ..models.diffrs import Discriminator, build_head
    from ..runtime import seeded

    with seeded(0, 0x48454144):
        head = build_head(unet, cfg.width, cfg.norm_num_groups)
    return Discriminator(unet, head)


# ---- head training ------------------------------------------------------------------------------
@dataclass
class HeadState:
    step: int = 0
    epoch: int = 0
    pos: int = 0
    best_val: float | None = None
    best_step: int = -1


def _items(ds, label: float) -> list[tuple]:
    return [(ds, i, label) for i in range(len(ds))]


def sample_split(folder: Path, view: Path, modalities) -> Path:
    """A dataset root whose ``train`` split is a ``medgen sample`` output folder: ``view/train/<i>`` links
    to each ``folder/<i>`` that holds every file of ``modalities`` (previews and records are skipped).
    A ``medgen sample --paired`` output (OUT/train/<i>/…, volumes also in 2D) is used as it is; 2D
    models need that form (plain 2D samples are single slices, not dataset volumes)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        from ..errors import InputError

        raise InputError(f"sample folder not found: {folder}", "diffrs.fake",
                         "make it with `medgen sample --run RUN --split train --out DIR`")
    if (folder / "train").is_dir():  # a `medgen sample --paired` output is a dataset root already
        return folder
    split = view / "train"
    split.mkdir(parents=True, exist_ok=True)
    for d in sorted(folder.iterdir()):
        if d.is_dir() and all((d / f"{m}.nii.gz").is_file() for m in modalities):
            link = split / d.name
            if not link.exists():
                link.symlink_to(d, target_is_directory=True)
    return view


def train_head(loaded, run_dir: Path, resume: bool, root: Path, provenance: dict) -> Path:
    """Train (or continue) a DiffRS head run; returns its last step folder."""
    from ..config import dump
    from ..jobs import build
    from ..runtime import StopSignals, pick_device
    from .logbook import Logbook, write_json_atomic, write_status

    p = loaded.preset
    cfg, tc = p.diffrs, p.train
    if not cfg.run:
        raise ConfigError("no diffusion model for the DiffRS head", "diffrs.run",
                          "--set diffrs.run=RUN_DIR (the bravo model whose samples are in diffrs.fake)")
    if not cfg.fake:
        raise ConfigError("no generated samples for the DiffRS head", "diffrs.fake",
                          "make them with `medgen sample --run RUN --split train --n N --out DIR`, "
                          "then --set diffrs.fake=DIR")
    ck, dp, unet = diffusion_model(cfg.run, cfg.which, cfg.weights)
    a, b = dp.data, p.data
    if (a.dims, a.mode, a.image_size, a.pad_depth_to) != (b.dims, b.mode, b.image_size, b.pad_depth_to):
        raise ConfigError(f"the diffusion model is {a.dims}D {a.mode} {a.image_size}px, the head preset "
                          f"{b.dims}D {b.mode} {b.image_size}px", "diffrs.run",
                          "use a head preset with the diffusion model's [data] geometry")
    if not resume:
        cfg.checkpoint, cfg.sha256 = str(Path(ck.step_dir).resolve()), _sha256(ck.step_dir)
    dev = pick_device(tc.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    disc = build_discriminator(unet, cfg).to(dev)
    strategy = build.build_strategy(dp)
    views = run_dir / "diffrs-data"  # fake sample folders seen as dataset splits (symlinks)
    mods = p.modalities()
    fake = sample_split(cfg.fake, views / "fake", mods)
    train_items = _items(build.build_dataset(p, p.data.train_split, root), 1.0) + \
        _items(build.build_dataset(p, "train", fake), 0.0)
    val_items = None
    if cfg.fake_val:
        fv = sample_split(cfg.fake_val, views / "fake_val", mods)
        val_items = _items(build.build_dataset(p, p.data.val_split, root), 1.0) + \
            _items(build.build_dataset(p, "train", fv), 0.0)
    opt = torch.optim.AdamW(disc.head.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    if not resume:
        write_json_atomic(run_dir / "config.json", {"preset": dump(p), "provenance": provenance})
    config_json = json.dumps(dump(p), sort_keys=True)
    st = HeadState()
    if resume:
        step_dir = ckpt.resolve_step_dir(run_dir, "latest")
        disc.head.load_state_dict(ckpt.load_group(step_dir, "model"))
        opt.load_state_dict(ckpt.load_optimizer_state(step_dir, opt.state_dict()))
        st = HeadState(**{k: v for k, v in json.loads((step_dir / "trainer_state.json").read_text()).items()
                          if k in HeadState.__dataclass_fields__})
    book = Logbook(run_dir)
    bs = tc.batch_size
    n = len(train_items)
    per_epoch = max(n // bs, 1)
    done = lambda: st.epoch >= tc.epochs or (tc.max_steps is not None and st.step >= tc.max_steps)  # noqa: E731

    def batch(items, keys_t, keys_n):
        image = torch.stack([ds[i]["image"] for ds, i, _ in items]).to(dev)
        cond = torch.stack([ds[i]["cond"] for ds, i, _ in items]).to(dev)
        label = torch.tensor([lab for *_, lab in items], device=dev)
        t = strategy.times_from_uniform(rand_keyed(keys_t, dev))
        x_t = strategy.noisy(image, randn_keyed(tuple(image.shape[1:]), keys_n, dev), t)
        return torch.cat([x_t, cond], 1), strategy.model_time(t), label

    def save():
        state = asdict(st)
        step_dir = ckpt.save_checkpoint(run_dir, st.step, st.epoch, {"model": disc.head.state_dict(),
                                                                     "optimizer": opt.state_dict()},
                                        {**state, "seed": tc.seed, "ema": None}, config_json)
        if st.best_step == st.step:
            ckpt.set_pointer(run_dir, "BEST", step_dir)
        ckpt.prune(run_dir, keep_last=tc.keep_last)
        return step_dir

    @torch.no_grad()
    def validate():
        disc.head.eval()
        losses, correct = [], 0
        for s in range(0, len(val_items), bs):
            idx = list(range(s, min(s + bs, len(val_items))))
            x, mt, y = batch([val_items[i] for i in idx], [(tc.seed, STREAM_VAL_T, i) for i in idx],
                             [(tc.seed, STREAM_VAL_NOISE, i) for i in idx])
            logit = disc(x, mt)
            losses.append(float(torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="sum")))
            correct += int(((logit > 0).float() == y).sum())
        return {"val_bce": sum(losses) / len(val_items), "val_acc": correct / len(val_items)}

    book.status("running", st)
    last_saved = st.step if resume else -1
    try:
        with StopSignals() as stop:
            while not done():
                perm = torch.randperm(n, generator=keyed_generator(tc.seed, STREAM_SHUFFLE, st.epoch)).tolist()
                for bi in range(st.pos, per_epoch):
                    chunk = perm[bi * bs:(bi + 1) * bs]
                    keys = [(tc.seed, st.step, j) for j in range(len(chunk))]
                    x, mt, y = batch([train_items[i] for i in chunk], [(k[0], STREAM_T, *k[1:]) for k in keys],
                                     [(k[0], STREAM_NOISE, *k[1:]) for k in keys])
                    disc.head.train()
                    logit = disc(x, mt)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    st.step, st.pos = st.step + 1, bi + 1
                    if st.step % tc.log_every == 0 or st.step == 1:
                        acc = float(((logit.detach() > 0).float() == y).float().mean())
                        book.log({"kind": "train", "step": st.step, "epoch": st.epoch, "loss": float(loss.detach()),
                                  "acc": acc, "lr": tc.lr})
                        book.status("running", st)
                    if stop.requested is not None:
                        save()
                        book.status("interrupted", st)
                        raise Interrupted(f"head training stopped at step {st.step}; state saved", str(run_dir),
                                          f"continue with: medgen train --resume --run-dir {run_dir}")
                    if done():
                        break
                if st.pos >= per_epoch:
                    st.epoch, st.pos = st.epoch + 1, 0
                last = done()
                if val_items and (st.pos == 0 and st.epoch % tc.val_every == 0 or last):
                    m = validate()
                    book.log({"kind": "val", "step": st.step, "epoch": st.epoch, **m})
                    if st.best_val is None or m["val_bce"] < st.best_val:
                        st.best_val, st.best_step = m["val_bce"], st.step
                if last or (st.pos == 0 and st.epoch % tc.ckpt_every == 0):
                    save()
                    last_saved = st.step
        if last_saved != st.step:
            save()
    except BaseException as e:
        if not isinstance(e, Interrupted):
            write_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    book.status("done", st)
    return ckpt.resolve_step_dir(run_dir, "latest")


# ---- the rejection sampler ----------------------------------------------------------------------
@dataclass
class Options:
    gamma: float = 0.75
    warmup: int = 10
    backsteps: int = 1
    max_iter: int | None = None  # NFE budget of one trajectory; None: 8 x steps


@dataclass
class Result:
    x: torch.Tensor  # (B, C, ...) model space
    nfe: list[int]  # per sample: velocity + head evaluations
    nfe_velocity: list[int]
    nfe_head: list[int]
    attempts: list[int]  # initial noises drawn
    backsteps: list[int]  # rejections after a step
    forced: list[bool]  # the NFE budget forced a re-initialisation
    cfg_batched: bool = False


@dataclass
class Thresholds:
    level: torch.Tensor  # (N+1,) γ-quantile of the logit at t_k
    diff: torch.Tensor  # (N+1,) γ-quantile of ℓ_k − ℓ_{k−1} (entry 0 unused)
    nfe: int = 0  # warm-up network evaluations (velocity + head), all trajectories together
    logits: torch.Tensor = field(default=None)  # (warmup, N+1)


class Evaluator:
    """The two network calls of DiffRS, counted per sample: ``velocity(x, t, cond)`` (the diffusion
    model) and ``logit(x, t, cond)`` (head on the frozen encoder); t (B,) normalised time."""

    def __init__(self, strategy, velocity_net, logit_net):
        self.strategy, self.vnet, self.lnet = strategy, velocity_net, logit_net
        self.calls_velocity = self.calls_head = 0  # rows evaluated (a batched call of B rows counts B)

    def velocity(self, x, t, cond):
        self.calls_velocity += x.shape[0]
        return self.vnet(torch.cat([x, cond.to(x.dtype)], 1), self.strategy.model_time(t)).float()

    def logit(self, x, t, cond):
        self.calls_head += x.shape[0]
        return self.lnet(torch.cat([x, cond.to(x.dtype)], 1), self.strategy.model_time(t)).float()


def _bt(t: float, n: int, dev) -> torch.Tensor:
    return torch.full((n,), float(t), dtype=torch.float32, device=dev)


def _euler(ev: Evaluator, x, ts, k: torch.Tensor, cond):
    """One Euler step of every row from grid index k_i to k_i + 1; returns (x', v)."""
    t0, t1 = ts[k].to(x.device), ts[k + 1].to(x.device)  # (B,)
    v = ev.velocity(x, t0.float(), cond)
    drift = ev.strategy.drift(v, x, t0.float())
    shape = (-1,) + (1,) * (x.ndim - 1)
    return x + ((t1 - t0).float()).reshape(shape) * drift, v


@torch.no_grad()
def warm_up(ev: Evaluator, ts, cond_pool: torch.Tensor, shape, seed: int, opts: Options, batch: int) -> Thresholds:
    """Thresholds from ``opts.warmup`` plain Euler trajectories (conditions ``cond_pool[j % len]``)."""
    n_steps = len(ts) - 1
    rows = []
    v0, h0 = ev.calls_velocity, ev.calls_head
    for s in range(0, opts.warmup, batch):
        js = list(range(s, min(s + batch, opts.warmup)))
        dev = cond_pool.device
        cond = cond_pool[[j % len(cond_pool) for j in js]]
        x = randn_keyed(shape, [(seed, STREAM_WARMUP, j) for j in js], dev)
        ls = [ev.logit(x, _bt(ts[0], len(js), dev), cond)]
        for k in range(n_steps):
            x, _ = _euler(ev, x, ts, torch.full((len(js),), k, dtype=torch.long), cond)
            ls.append(ev.logit(x, _bt(ts[k + 1], len(js), dev), cond))
        rows.append(torch.stack(ls, 1).cpu())  # (b, N+1)
    logits = torch.cat(rows).double()
    level = torch.quantile(logits, opts.gamma, dim=0)
    d = torch.zeros_like(level)
    d[1:] = torch.quantile(logits[:, 1:] - logits[:, :-1], opts.gamma, dim=0)
    return Thresholds(level, d, ev.calls_velocity - v0 + ev.calls_head - h0, logits)


@torch.no_grad()
def rejection_sample(ev: Evaluator, ts, cond: torch.Tensor, shape, keys: list[tuple[int, int]], thr: Thresholds,
                     opts: Options) -> Result:
    """DiffRS for samples ``keys[i]`` = (seed, index) with conditions ``cond[i]``; see the module docstring."""
    b, n_steps, dev = len(keys), len(ts) - 1, cond.device
    budget = opts.max_iter or 8 * n_steps
    x = torch.zeros((b, *shape), device=dev)
    k = torch.zeros(b, dtype=torch.long)
    hist = torch.zeros(b, n_steps + 1, dtype=torch.float64)  # accepted logit at each grid index
    phase = ["init"] * b  # init | step | done
    rejecting = [True] * b
    attempts, draws, backs, used = [0] * b, [0] * b, [0] * b, [0] * b
    nv, nh, forced = [0] * b, [0] * b, [False] * b

    def u(i):
        draws[i] += 1
        return float(rand_keyed([(keys[i][0], STREAM_U, keys[i][1], draws[i])])[0])

    def spend(rows, velocity: bool):
        for i in rows:
            used[i] += 1
            (nv if velocity else nh)[i] += 1

    def reinit_if_spent(i):
        if rejecting[i] and used[i] >= budget:
            rejecting[i], forced[i], phase[i] = False, True, "init"
            attempts[i] += 1

    while True:
        init = [i for i in range(b) if phase[i] == "init"]
        if init:
            seed_idx = [(keys[i][0], STREAM_INIT, keys[i][1], attempts[i]) for i in init]
            x[init] = randn_keyed(shape, seed_idx, dev)
            k[init] = 0
            check = [i for i in init if rejecting[i]]
            for i in init:
                if not rejecting[i]:
                    phase[i] = "step"
            if check:
                lg = ev.logit(x[check], _bt(ts[0], len(check), dev), cond[check]).double().cpu()
                spend(check, False)
                for j, i in enumerate(check):
                    if lg[j] >= thr.level[0] + math.log(u(i)):
                        phase[i], hist[i, 0] = "step", lg[j]
                    else:
                        attempts[i] += 1
                        reinit_if_spent(i)
        step = [i for i in range(b) if phase[i] == "step"]
        if not step and not any(ph == "init" for ph in phase):
            break
        if not step:
            continue
        kk = k[step]
        xn, v = _euler(ev, x[step], ts, kk, cond[step])
        spend(step, True)
        k1 = kk + 1
        check = [j for j, i in enumerate(step) if rejecting[i] and opts.backsteps > 0]
        accept = [True] * len(step)
        if check:
            rows = [step[j] for j in check]
            t1 = ts[k1[check]].float().to(dev)
            lg = ev.logit(xn[check], t1, cond[rows]).double().cpu()
            spend(rows, False)
            for c, j in enumerate(check):
                i, kn = step[j], int(k1[j])
                logu = math.log(u(i))
                prev = float(hist[i, int(kk[j])])
                if lg[c] < thr.diff[kn] + logu + prev or lg[c] < thr.level[kn] + logu:
                    accept[j] = False
                else:
                    hist[i, kn] = lg[c]
        for j, i in enumerate(step):
            if accept[j]:
                x[i], k[i] = xn[j], k1[j]
                if int(k1[j]) == n_steps:
                    phase[i] = "done"
            else:  # backstep: x̂0 from the step just taken, re-noised to an earlier grid time
                backs[i] += 1
                kb = max(int(k1[j]) - opts.backsteps, 0)
                x0 = ev.strategy.x0_from(xn[j:j + 1], v[j:j + 1], ts[k1[j:j + 1]].float().to(dev))
                z = randn_keyed(shape, [(keys[i][0], STREAM_BACK, keys[i][1], attempts[i], backs[i])], dev)
                x[i] = ev.strategy.noisy(x0, z, _bt(ts[kb], 1, dev))[0]
                k[i] = kb
            reinit_if_spent(i)
    nfe = [a + c for a, c in zip(nv, nh)]
    return Result(x, nfe, nv, nh, [a + 1 for a in attempts], backs, forced)


class DiffRSSampler:
    """``medgen sample --diffrs HEAD_RUN``: thresholds once per command, then rejection sampling per batch."""

    def __init__(self, head_ref: str, model, strategy, preset, sc, opts: Options, dev, model_step_dir):
        from ..config import validate

        hck = ckpt.load_checkpoint(head_ref, "best", "raw")
        hp = validate(hck.config, where=str(hck.step_dir))
        if not hp.diffrs.enabled:
            raise ConfigError("--diffrs needs a DiffRS head run", str(hck.step_dir),
                              "train one with `medgen train --preset 3d-pixel-256-diffrs`")
        sha = _sha256(model_step_dir) if Path(model_step_dir).exists() else None
        if hp.diffrs.sha256 and sha != hp.diffrs.sha256:
            log.warning("warning: the DiffRS head was trained on %s, sampling uses %s", hp.diffrs.checkpoint,
                        model_step_dir)
        unet = model
        self.disc = build_discriminator(unet, hp.diffrs)
        self.disc.head.load_state_dict(hck.model_state)
        self.disc.to(dev).eval()
        self.ev = Evaluator(strategy, model, self.disc)
        self.head_step = str(hck.step_dir)
        self.opts, self.sc, self.preset, self.dev = opts, sc, preset, dev
        self.ts = strategy.time_grid(sc.steps, None if sc.grid == "train" else
                                     (1.0 if sc.grid == "uniform" else float(sc.grid)))
        self.thr: Thresholds | None = None

    def _stack(self, conds) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.stack([c.cond for c in conds])).to(self.dev)

    def generate(self, conds, idx, shape, all_conds):
        """Samples ``idx``; thresholds come first from warm-up trajectories on the conditions of the first
        min(warmup, n) outputs (``all_conds``), the same whatever the batch size."""
        from ..runtime import autocast

        with autocast(self.dev, self.preset.train.precision):
            if self.thr is None:
                pool = self._stack(all_conds[: max(1, min(self.opts.warmup, len(all_conds)))])
                self.thr = warm_up(self.ev, self.ts, pool, shape, self.sc.seed, self.opts, self.sc.batch_size)
                log.info("DiffRS thresholds from %d warm-up trajectories (%d NFE)", self.opts.warmup, self.thr.nfe)
            return rejection_sample(self.ev, self.ts, self._stack(conds), shape, [(self.sc.seed, i) for i in idx],
                                    self.thr, self.opts)

    def record(self, res: Result, j: int) -> dict:
        o = self.opts
        return {"diffrs": self.head_step, "diffrs_backsteps": o.backsteps, "diffrs_gamma": o.gamma,
                "diffrs_warmup": o.warmup, "diffrs_max_iter": o.max_iter or 8 * self.sc.steps,
                "nfe_velocity": res.nfe_velocity[j], "nfe_head": res.nfe_head[j],
                "nfe_counts": "velocity (full UNet) + head (UNet encoder + middle block + head) evaluations",
                "diffrs_attempts": res.attempts[j], "diffrs_rejections": res.backsteps[j],
                "diffrs_forced_reinit": res.forced[j], "diffrs_warmup_nfe": self.thr.nfe if self.thr else 0}


# ---- `medgen sample` hooks (jobs/sample.py calls these) -----------------------------------------
DIFFRS_OPTIONS = ("diffrs", "diffrs_backsteps", "diffrs_gamma", "diffrs_warmup", "diffrs_max_iter")


def pop_options(opts: dict, paired) -> tuple[str, Options] | None:
    """Take the --diffrs* options out of ``opts``; None without --diffrs (then none may be given)."""
    from ..errors import UsageError

    vals = {k: opts.pop(k, None) for k in DIFFRS_OPTIONS}
    head = vals.pop("diffrs")
    if head is None:
        given = [f"--{k.replace('_', '-')}" for k, v in vals.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need --diffrs HEAD_RUN", given[0], "add --diffrs HEAD_RUN")
        return None
    if paired is not None:
        raise UsageError("--diffrs does not combine with --paired", "--diffrs", "drop one of them")
    o = Options()
    if vals["diffrs_backsteps"] is not None:
        o.backsteps = int(vals["diffrs_backsteps"])
    if vals["diffrs_gamma"] is not None:
        o.gamma = float(vals["diffrs_gamma"])
    if vals["diffrs_warmup"] is not None:
        o.warmup = int(vals["diffrs_warmup"])
    o.max_iter = vals["diffrs_max_iter"]
    if o.backsteps < 0 or not 0.0 < o.gamma < 1.0 or o.warmup < 1 or (o.max_iter is not None and o.max_iter < 1):
        raise UsageError("DiffRS needs --diffrs-backsteps >= 0, 0 < --diffrs-gamma < 1, --diffrs-warmup >= 1, "
                         "--diffrs-max-iter >= 1", "--diffrs", "e.g. --diffrs-backsteps 1 --diffrs-gamma 0.75")
    return str(head), o


def check_plan(preset, sc) -> None:
    from ..errors import UsageError

    if preset.diffusion.kind != "rflow" or sc.solver != "euler":
        raise UsageError("DiffRS runs on rectified-flow models with the Euler solver", "--diffrs",
                         "use --solver euler with an rflow model")
    if sc.cfg != 1.0 or (sc.cfg_end is not None and sc.cfg_end != 1.0) or sc.restart is not None:
        raise UsageError("DiffRS does not combine with CFG or Restart", "--diffrs", "drop --cfg/--cfg-end/--restart")
    if preset.model.kind != "unet" or preset.vector_channels() or preset.controlnet.stage \
            or preset.space.kind != "pixel":
        raise UsageError("DiffRS needs a plain UNet in pixel space", "--diffrs", "sample without --diffrs")
    if preset.train.self_conditioning == "x0":
        raise UsageError("DiffRS does not support self-conditioned models (its head reads the network without the "
                         "x0 estimate channels)", "--diffrs", "sample without --diffrs")
