"""The diffusion training loop: AdamW, warm-up + cosine, clipping, EMA, validation, checkpoints.

Exact resume: every random draw is keyed by (seed, step, sample) or (seed, epoch), the LR is a
function of the step, and the state saved with a checkpoint (weights, EMA, optimizer tensors, step,
epoch, position in the epoch) is all the loop has. So "train N" and "train N/2, stop, resume to N"
give bit-identical weights on CPU. A SIGTERM/SIGUSR1 saves after the current step and raises
`Interrupted` (exit 130).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..errors import ConfigError, InputError, Interrupted
from ..runtime import (LaggedVote, World, any_rank, autocast, broadcast_float, keyed_generator, keyed_seed,
                       persistent_compile_cache, rand_keyed, randn_keyed)
from . import tricks
from .ema import EMA
from .logbook import Logbook
from .parallel import Parallel
from .schedule import lr_at

log = logging.getLogger("medgen")

# Stream ids keep the keyed random draws of different purposes apart.
(STREAM_SHUFFLE, STREAM_T, STREAM_NOISE, STREAM_VAL_T, STREAM_VAL_NOISE, STREAM_PREVIEW, STREAM_NOISE_AUG,
 STREAM_JITTER, STREAM_GRAD_NOISE, STREAM_FEATURES) = range(1, 11)
# --- modes & conditioning: condition dropout, whole-batch vector dropout, grouped batches ---
STREAM_COND_DROP, STREAM_VECTOR_DROP, STREAM_GROUPS = 11, 12, 13
STREAM_SELFCOND = 14  # self-conditioning: which samples get the x̂0 estimate (engine/selfcond.py)
VAL_PERCEPTUAL_WEIGHT = 0.001  # compat.val_perceptual: the reference's perceptual weight in its "total"


@dataclass
class State:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # completed epochs
    pos: int = 0  # batches done in the current epoch
    best_val: float = math.inf
    best_step: int = -1
    last_val_step: int = -1


def collate(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.stack([it["image"] for it in items])  # (B, C, ...)
    cond = torch.stack([it["cond"] for it in items])  # (B, C_cond, ...)
    return image, cond


class _EpochItems(torch.utils.data.Dataset):
    """The training set indexed by (epoch, item): sets the epoch of keyed dynamic augmentation where
    the item is read (each loader process holds its own copy of the dataset)."""

    def __init__(self, ds):
        self.ds, self.epoch = ds, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch, i = key
        if epoch != self.epoch and hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        self.epoch = epoch
        return self.ds[i]


def loss_at(model, strategy, image, cond, t, noise, weight=None):
    """One forward pass at times t (B,); returns (fp32 loss, prediction, x_t, target)."""
    x_t = strategy.noisy(image, noise, t)  # (B, C, ...)
    target = strategy.target(image, noise, t)
    pred = model(torch.cat([x_t, cond], dim=1), strategy.model_time(t))
    return strategy.loss(pred.float(), target.float(), weight), pred, x_t, target


def diffusion_loss(model, strategy, image, cond, u, noise):
    """One forward pass on keyed draws; returns (fp32 loss, prediction, x_t, t). A self-conditioned
    network gets its own x̂0 estimate (engine/selfcond.py: validation and one-step evaluation)."""
    from .selfcond import wrap_all

    model = wrap_all(model, strategy)
    t = strategy.times_from_uniform(u)  # (B,)
    loss, pred, x_t, _ = loss_at(model, strategy, image, cond, t, noise)
    return loss, pred, x_t, t


class Trainer:
    def __init__(self, model: nn.Module, strategy, train_ds, val_ds, cfg, run_dir: Path,
                 config_json: str, device: torch.device, num_workers: int = 0, world: World = World(),
                 min_snr_unsquared: bool = False, space=None):
        self.space = space  # spaces.Space or None (pixels): batches are encoded before the loss
        self.model, self.strategy, self.cfg, self.world = model.to(device), strategy, cfg, world
        if cfg.batch_size % world.size:
            raise ConfigError(f"train.batch_size={cfg.batch_size} does not split over {world.size} processes",
                              "train.batch_size", "use a global batch size divisible by the number of GPUs")
        self.local_batch = cfg.batch_size // world.size
        if getattr(cfg, "compile", False) and device.type == "cuda":
            from .fastpath import exact_fast_ops, to_channels_last  # compiled convolutions run fastest channels-last

            to_channels_last(exact_fast_ops(self.model))
        # What the training step calls: the DDP wrapper, the model sharded in place by FSDP, or the model itself
        # (one process; "allreduce", which ddp becomes for CUDA-graph steps: engine/parallel.py)
        compile_mode = getattr(cfg, "compile_mode", "default") if getattr(cfg, "compile", False) else None
        graphs = compile_mode == "reduce-overhead" and device.type == "cuda"
        self.parallel = Parallel(world, device, getattr(cfg, "parallel", "auto"), graphs=graphs)
        self.net = self.parallel.wrap(self.model)
        # CUDA graphs: on CUDA, not with FSDP (it communicates from hooks; DDP became "allreduce" above)
        self._graph_steps = graphs and self.parallel.kind != "fsdp"
        self.train_ds, self.val_ds, self.run_dir, self.device = train_ds, val_ds, Path(run_dir), device
        self.config_json, self.num_workers = config_json, num_workers
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        e = cfg.ema
        self.ema = EMA(self.model, e.decay, e.start_step, e.every) if e.enabled else None
        self.state = State()
        # Incomplete last batches are dropped (when a full one exists), so every step has the same
        # global batch and data-parallel ranks always hold equal shares.
        n = len(train_ds)
        self.steps_per_epoch = n // cfg.batch_size if n >= cfg.batch_size else 1
        # --- modes & conditioning: multi mode batches hold one modality id each ---
        self._groups = train_ds.groups() if hasattr(train_ds, "groups") else [list(range(n))]
        if len(self._groups) > 1:
            self.steps_per_epoch = sum(self._group_batches(len(g)) for g in self._groups)
        self.book = Logbook(self.run_dir, enabled=world.main)  # rank 0 writes logs and checkpoints
        self.spike = tricks.SpikeGuard(**cfg.spike_skip.model_dump()) if cfg.spike_skip else None
        self.plateau = tricks.Plateau(cfg.plateau_factor, cfg.plateau_patience) \
            if cfg.schedule == "plateau" else None
        self.features = tricks.FeaturePerturbation(self.model, cfg.feature_perturbation) \
            if cfg.feature_perturbation else None
        self.min_snr_unsquared = min_snr_unsquared
        # --- scoreaug/sda: ScoreAug / SDA / regional weighting / bf16 MSE loss; torch.compile ---
        self.extras = tricks.LossExtras.from_config(cfg, config_json, self.model)
        self._compat(config_json)  # compat.first_mode_batches, compat.val_perceptual
        if compile_mode is not None:
            if compile_mode == "reduce-overhead" and not self._graph_steps:
                compile_mode = "default"
            persistent_compile_cache()
            self.net = torch.compile(self.net, mode=None if compile_mode == "default" else compile_mode)

    # ---- randomness -------------------------------------------------------------------------
    def _keys(self, stream: int, step: int, n: int) -> list[tuple[int, ...]]:
        """Keys of this rank's samples: global sample index = rank * local batch + j."""
        first = self.world.rank * self.local_batch
        return [(self.cfg.seed, stream, step, first + j) for j in range(n)]

    def _permutation(self, epoch: int) -> list[int]:
        g = keyed_generator(self.cfg.seed, STREAM_SHUFFLE, epoch)
        return torch.randperm(len(self.train_ds), generator=g).tolist()

    # --- modes & conditioning ------------------------------------------------------
    def _group_batches(self, n: int) -> int:
        bs = self.cfg.batch_size
        return n // bs if n >= bs else 1

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This epoch's global batches (item indices), a keyed function of (seed, epoch). One group:
        chunks of a permutation. Several (multi mode): each group permuted and chunked, incomplete
        batches dropped, then the batches shuffled, so every batch holds one modality id."""
        bs = self.cfg.batch_size
        if len(self._groups) == 1:
            perm = self._permutation(epoch)
            return [perm[p * bs:(p + 1) * bs] for p in range(self.steps_per_epoch)]
        batches = []
        for k, grp in enumerate(self._groups):
            order = torch.randperm(len(grp), generator=keyed_generator(self.cfg.seed, STREAM_SHUFFLE, epoch, k))
            batches += [[grp[j] for j in order[p * bs:(p + 1) * bs].tolist()]
                        for p in range(self._group_batches(len(grp)))]
        order = torch.randperm(len(batches), generator=keyed_generator(self.cfg.seed, STREAM_GROUPS, epoch))
        return [batches[i] for i in order.tolist()]

    def _condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Training-time condition dropout: each sample's whole condition zeroed with p =
        ``train.cond_dropout`` (keyed by seed, step, global sample index), which is the zero
        condition CFG's unconditional branch uses; then the model's ``vector_dropout`` (mode strategy
        "dropout") zeroes the whole batch's vector channels with one draw keyed by (seed, step)."""
        cfg, s, b = self.cfg, self.state.step, cond.shape[0]
        if getattr(self, "first_mode_batches", False):
            cond = self._first_mode(cond, getattr(self, "_batch_first", None))
        if cfg.cond_dropout and cond.shape[1]:
            u = rand_keyed(self._keys(STREAM_COND_DROP, s, b), self.device)  # (B,)
            keep = (u >= cfg.cond_dropout).to(cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
            cond = cond * keep
        p, n_vec = getattr(self.model, "vector_dropout", 0.0), getattr(self.model, "n_vector", 0)
        if p and n_vec and float(rand_keyed([(cfg.seed, STREAM_VECTOR_DROP, s)])[0]) < p:
            cond = torch.cat([cond[:, :-n_vec], torch.zeros_like(cond[:, -n_vec:])], dim=1)
        return cond

    # ---- data -------------------------------------------------------------------------------
    def _batches(self, epoch: int):
        """This rank's batches from (epoch, the saved position) on, epoch after epoch, as (image, cond) on
        the device.

        One loader serves every epoch, so its worker processes (``data.num_workers``) start once and
        read ahead across epoch ends (during validation too); items are keyed by (epoch, index), so
        dynamic augmentation draws the same wherever an item is read."""
        lo, pos = self.world.rank * self.local_batch, self.state.pos  # this rank's share of each global batch

        def global_batches():
            for e in itertools.count(epoch):
                yield from ((e, b) for b in self._epoch_batches(e)[pos if e == epoch else 0:])

        shares = ([(e, i) for i in b[lo:lo + self.local_batch]] for e, b in global_batches())
        loader = torch.utils.data.DataLoader(_EpochItems(self.train_ds), batch_sampler=shares, collate_fn=collate,
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for (_, batch), (image, cond) in zip(global_batches(), loader):
            self._batch_first = batch[0]  # compat.first_mode_batches: the global batch's first item
            yield image.to(self.device, non_blocking=True), cond.to(self.device, non_blocking=True)

    # ---- one optimizer step -----------------------------------------------------------------
    def _lr(self, step: int) -> float:
        cfg = self.cfg
        kind = "constant" if cfg.schedule == "plateau" else cfg.schedule
        lr = lr_at(step, cfg.lr, self.steps_per_epoch, cfg.epochs, cfg.warmup_epochs, kind, cfg.eta_min)
        return max(lr * self.plateau.state["scale"], cfg.eta_min) if self.plateau else lr

    def _draws(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's times t (B,) and noise, keyed; curriculum, jitter and noise augmentation."""
        cfg, s, b = self.cfg, self.state.step, image.shape[0]
        shape = tuple(image.shape[1:])
        u = rand_keyed(self._keys(STREAM_T, s, b), self.device)  # (B,)
        if cfg.curriculum:
            c = cfg.curriculum
            t = tricks.snap_rflow(self.strategy, u * tricks.curriculum_max(self.state.epoch, c.epochs, c.start_max))
        else:
            t = self.strategy.times_from_uniform(u)
        if cfg.timestep_jitter:
            z = randn_keyed((), self._keys(STREAM_JITTER, s, b), self.device)  # (B,)
            t = tricks.snap_rflow(self.strategy, (t + cfg.timestep_jitter * z).clamp(0, 1))
        noise = randn_keyed(shape, self._keys(STREAM_NOISE, s, b), self.device)
        if cfg.noise_augmentation:
            extra = randn_keyed(shape, self._keys(STREAM_NOISE_AUG, s, b), self.device)
            noise = tricks.augment_noise(noise, extra, cfg.noise_augmentation)
        return t, noise

    def _loss(self, image, cond, t, noise) -> torch.Tensor:
        cfg, s = self.cfg, self.state.step
        weight = None
        if cfg.min_snr_gamma:
            weight = tricks.min_snr_weight(self.strategy, t, cfg.min_snr_gamma, self.min_snr_unsquared)
        if self.features:
            self.features.generator.manual_seed(keyed_seed(cfg.seed, STREAM_FEATURES, s, self.world.rank))
        net = self._self_cond(self.net, image.shape[0])  # self-conditioning (engine/selfcond.py)
        with autocast(self.device, cfg.precision):
            # --- scoreaug/sda ---
            if self.extras is not None:
                return self.extras.loss(net, self.strategy, image, cond, t, noise, weight, s)
            loss, *_ = loss_at(net, self.strategy, image, cond, t, noise, weight)
        return loss

    # --- self-conditioning, compat.first_mode_batches, compat.val_perceptual ----------------
    def _self_cond(self, net, b: int):
        """``net``, or the two-pass self-conditioning step over it (keyed per global sample)."""
        from ..models.selfcond import channels

        n = channels(self.model)
        if not n:
            return net
        from .selfcond import SelfCondNet, picks

        use, run = picks(self.cfg.seed, STREAM_SELFCOND, self.state.step, self.world.rank * b, b, self.world.size,
                         self.cfg.self_conditioning_prob, self.device)
        return SelfCondNet(net, self.strategy, n, use, run)

    def _compat(self, config_json: str) -> None:
        try:
            compat = (json.loads(config_json or "{}") or {}).get("compat", {}) or {}
        except ValueError:
            compat = {}
        self.first_mode_batches = bool(compat.get("first_mode_batches"))
        if self.first_mode_batches:  # mixed-modality batches: one group, shuffled as a whole
            n = len(self.train_ds)
            self._groups = [list(range(n))]
            self.steps_per_epoch = n // self.cfg.batch_size if n >= self.cfg.batch_size else 1
        self.val_perceptual = bool(compat.get("val_perceptual"))
        if self.val_perceptual:
            from ..metrics.perceptual import radimagenet_path

            try:
                radimagenet_path()
            except InputError:  # the quirk only changes a logged total: say so and train on
                log.warning("warning: compat.val_perceptual: RadImageNet ResNet50 weights not found, so val_loss is "
                            "the plain MSE, not the reference's MSE + 0.001 x perceptual; to reproduce it set "
                            "$MEDGEN_WEIGHTS_RADIMAGENET_RESNET50=FILE (RadImageNet-ResNet50_notop.pth)")
                self.val_perceptual = False

    def _first_mode(self, cond: torch.Tensor, first_item) -> torch.Tensor:
        """compat.first_mode_batches: every sample takes the modality maps (the trailing 4 channels) of the
        batch's first item — the global batch's, from the dataset when it can tell, else this share's first."""
        from ..data.datasets import MODE_IDS, mode_maps

        if first_item is not None and hasattr(self.train_ds, "modality_of"):
            maps = mode_maps(MODE_IDS[self.train_ds.modality_of(first_item)], cond.shape[2:]).to(cond)
        else:
            maps = cond[0, -4:]
        return torch.cat([cond[:, :-4], maps.unsqueeze(0).expand(cond.shape[0], *maps.shape)], dim=1)

    def _step(self, image, cond) -> dict:
        cfg, s = self.cfg, self.state.step
        if self._graph_steps:  # a new iteration for the CUDA-graph trees (outputs of the last may be reused)
            torch.compiler.cudagraph_mark_step_begin()
        image, cond = self._encode(image, cond)  # space (s2d/wavelet) before noise, times and loss
        lr = self._lr(s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        t, noise = self._draws(image)
        cond = self._condition(cond)  # modes & conditioning
        self.model.train()
        loss = self._loss(image, cond, t, noise)
        loss.backward()
        self.parallel.sync_grads(self.model)  # "allreduce": the ranks' gradients averaged (DDP: in the backward)
        if cfg.sam:  # second pass at the (A)SAM ascent point; its gradient drives the step
            moves = tricks.sam_perturb(self.model, cfg.sam.rho, cfg.sam.adaptive)
            self.opt.zero_grad(set_to_none=True)
            self._loss(image, cond, t, noise).backward()
            self.parallel.sync_grads(self.model)
            tricks.sam_restore(moves)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        if not (self.spike and self.spike.skip(float(norm))):
            if cfg.grad_noise:
                g = keyed_generator(cfg.seed, STREAM_GRAD_NOISE, s)
                tricks.add_grad_noise(self.model.parameters(), cfg.grad_noise, s, g)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.state.step)
        return {"loss": loss.detach(), "lr": lr, "grad_norm": norm.detach()}  # tensors: no host sync

    # ---- space (spaces.py) ------------------------------------------------------------------
    def _encode(self, image, cond):
        return (image, cond) if self.space is None else self.space.encode_pair(image, cond)

    def _decode(self, x):
        return x if self.space is None else self.space.decode(x)

    # ---- validation -------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The weights validation and previews use: EMA when on, else the raw model (FSDP: rank 0's
        whole copy, gathered by ``self.parallel.gather_eval`` on every rank just before)."""
        if self.parallel.eval_net is not None:
            return self.parallel.eval_net
        if self.ema is None:
            return self.model
        if not hasattr(self, "_ema_model"):
            import copy

            self._ema_model = copy.deepcopy(self.model)
        self.ema.copy_to(self._ema_model)
        return self._ema_model

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean velocity/epsilon MSE and one-step x0 PSNR on the validation set, fixed draws."""
        from ..metrics.image import psnr

        model = self.eval_model().eval()
        n = len(self.val_ds) if self.cfg.val_max_items is None else min(len(self.val_ds), self.cfg.val_max_items)
        losses, psnrs, percs, bs = [], [], [], self.cfg.batch_size
        for start in range(0, n, bs):
            idx = list(range(start, min(start + bs, n)))
            items = [self.val_ds[i] for i in idx]
            image = torch.stack([it["image"] for it in items]).to(self.device)
            cond = torch.stack([it["cond"] for it in items]).to(self.device)
            if getattr(self, "first_mode_batches", False):  # the batch's first item's modality for all (compat)
                cond = self._first_mode(cond, None)
            pixels = image
            image, cond = self._encode(image, cond)
            keys_t = [(self.cfg.seed, STREAM_VAL_T, i) for i in idx]
            keys_n = [(self.cfg.seed, STREAM_VAL_NOISE, i) for i in idx]
            u = rand_keyed(keys_t, self.device)
            noise = randn_keyed(tuple(image.shape[1:]), keys_n, self.device)
            with autocast(self.device, self.cfg.precision):
                loss, pred, x_t, t = diffusion_loss(model, self.strategy, image, cond, u, noise)
            x0 = self._decode(self.strategy.x0_from(x_t.float(), pred.float(), t)).clamp(0, 1)
            losses.append(float(loss) * len(idx))
            psnrs.append(psnr(x0, pixels).sum().item())
            if getattr(self, "val_perceptual", False):  # compat: reference "total" = MSE + 0.001 x perceptual
                from ..metrics.perceptual import perceptual_radimagenet

                percs.append(perceptual_radimagenet(x0, pixels).sum().item())
        out = {"val_loss": sum(losses) / n, "val_psnr": sum(psnrs) / n}
        if percs:
            out = {**out, "val_mse": out["val_loss"], "val_perceptual": sum(percs) / n,
                   "val_loss": out["val_loss"] + VAL_PERCEPTUAL_WEIGHT * sum(percs) / n}
        return out

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> Path | None:
        self._saved_step = self.state.step
        groups = self.parallel.full_groups(self.model, self.opt, self.ema)  # FSDP: every rank gathers
        if not self.world.main:
            return None
        state = {**asdict(self.state), "ema": self.ema.state() if self.ema else None, "seed": self.cfg.seed,
                 "spike": self.spike.state if self.spike else None,
                 "plateau": self.plateau.state if self.plateau else None}
        if math.isinf(state["best_val"]):
            state["best_val"] = None
        step_dir = ckpt.save_checkpoint(self.run_dir, self.state.step, self.state.epoch, groups, state,
                                        self.config_json)
        if self.state.best_step == self.state.step:
            ckpt.set_pointer(self.run_dir, "BEST", step_dir)
        ckpt.prune(self.run_dir, keep_last=self.cfg.keep_last)
        return step_dir

    def resume(self, step_dir: Path) -> None:
        self.parallel.load_model(self.model, ckpt.load_group(step_dir, "model"))  # FSDP: this rank's shards
        st = json.loads((Path(step_dir) / "trainer_state.json").read_text())
        self.parallel.load_optimizer(self.opt, ckpt.load_optimizer_state(step_dir, self.opt.state_dict()))
        for p, moments in self.opt.state.items():  # saved contiguous: back to each parameter's layout
            for k, v in moments.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    moments[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        if self.ema is not None:
            if st.get("ema") is None:
                raise InputError("cannot resume with EMA on: the checkpoint has no EMA weights", str(step_dir),
                                 "resume with --set train.ema.enabled=false")
            self.ema.load(self.parallel.local_like(ckpt.load_group(step_dir, "ema"), self.ema.shadow), st["ema"])
        best = st.get("best_val")
        self.state = State(step=st["step"], epoch=st["epoch"], pos=st["pos"],
                           best_val=math.inf if best is None else best, best_step=st["best_step"],
                           last_val_step=st.get("last_val_step", -1))
        for part, name in ((self.spike, "spike"), (self.plateau, "plateau")):
            if part is not None and st.get(name):
                part.state.update(st[name])
        self._saved_step = self.state.step

    # ---- the loop ---------------------------------------------------------------------------
    def _done(self) -> bool:
        cap = self.cfg.max_steps
        return self.state.epoch >= self.cfg.epochs or (cap is not None and self.state.step >= cap)

    def _after_validation(self, metrics: dict) -> None:
        st = self.state
        st.last_val_step = st.step
        self.book.log({"kind": "val", "step": st.step, "epoch": st.epoch, **metrics})
        if self.plateau:
            self.plateau.observe(metrics["val_loss"])
        if 0 < metrics["val_loss"] < st.best_val:
            st.best_val, st.best_step = metrics["val_loss"], st.step

    def _epoch_end(self, preview) -> None:
        st, cfg = self.state, self.cfg
        st.epoch, st.pos = st.epoch + 1, 0
        last = self._done()
        val = st.epoch % cfg.val_every == 0 or last
        show = bool(preview and cfg.preview_every and (st.epoch % cfg.preview_every == 0 or last))
        if val or show:  # FSDP: every rank helps gather rank 0's whole weights (else nothing)
            self.parallel.gather_eval(self.model, self.ema)
        if self.world.main and val:
            self._after_validation(self.validate())
        if self.plateau:  # rank 0 validated; every rank must use its LR scale
            self.plateau.state["scale"] = broadcast_float(self.plateau.state["scale"], self.world, self.device)
        if self.world.main and show:
            preview(self, st.epoch)
        # rank 0 alone knows a new best: every rank decides together (FSDP's save gathers on all ranks)
        if any_rank(st.epoch % cfg.ckpt_every == 0 or st.best_step == st.step or last, self.world, self.device):
            self.save()

    def fit(self, stop, preview=None) -> State:
        """Train until `epochs` or `max_steps`; `stop.requested` saves and raises Interrupted."""
        st, cfg = self.state, self.cfg
        self.book.status("running", st)
        t0, step0 = time.time(), st.step
        stop_voted = LaggedVote(self.world, self.device)  # several ranks: agreed one step late, no per-step stall
        if not self._done() and st.pos >= self.steps_per_epoch:  # resumed right at an epoch's end
            self._epoch_end(preview)
        batches = self._batches(st.epoch)
        try:
            while not self._done():
                stats = self._step(*next(batches))
                st.pos += 1
                if st.step % cfg.log_every == 0 or st.step == step0 + 1:
                    rate = (st.step - step0) / max(time.time() - t0, 1e-9)
                    stats = {k: float(v) for k, v in stats.items()}
                    self.book.log({"kind": "train", "step": st.step, "epoch": st.epoch, **stats,
                                   "steps_per_s": rate})
                    self.book.status("running", st)
                if cfg.ckpt_every_steps and st.step % cfg.ckpt_every_steps == 0:
                    self.save()
                if stop_voted(stop.requested is not None):
                    self.save()
                    self.book.status("interrupted", st)
                    raise Interrupted(f"training stopped by {stop.requested or 'a signal'} at step {st.step}; "
                                      "state saved",
                                      str(self.run_dir),
                                      f"continue with: medgen train --resume --run-dir {self.run_dir}")
                if st.pos >= self.steps_per_epoch:
                    self._epoch_end(preview)
        finally:
            batches.close()  # ends the loader (and its worker processes)
        if any_rank(self.world.main and st.last_val_step != st.step, self.world, self.device):  # stopped mid-epoch
            self.parallel.gather_eval(self.model, self.ema)
            if self.world.main:
                self._after_validation(self.validate())
        if getattr(self, "_saved_step", -1) != st.step:
            self.save()
        elif self.world.main and st.best_step == st.step:
            ckpt.set_pointer(self.run_dir, "BEST", ckpt.resolve_step_dir(self.run_dir, "latest"))
        self.book.status("done", st)
        return st
