"""Data parallelism for the Trainer: DDP, or FSDP (torch's FSDP2 ``fully_shard``) for big models.

``train.parallel`` (config/schema.py): "ddp" replicates the model on every rank and all-reduces the
gradients from hooks during the backward (DDP's buckets, overlapping communication with it);
"allreduce" replicates it too but averages the gradients with one all-reduce after the backward
(``sync_grads``): no overlap, but nothing inside the backward that a CUDA graph cannot replay, so it is
what "ddp" becomes under ``train.compile_mode="reduce-overhead"``; "fsdp" shards parameters,
gradients, AdamW state and the EMA shadow over the ranks (each UNet down/middle/up block, or DiT
block, is one unit, gathered for its forward and backward and resharded after); "auto" picks FSDP
above 1e9 parameters (engine/planner.py ``parallel_kind``). One process: no wrapper; "fsdp" there is
refused (exit 3).

What stays the same under FSDP:

- Checkpoints. Rank 0 writes the usual sharded safetensors of *full* tensors: every rank takes part in
  gathering each sharded tensor (``DTensor.full_tensor``), rank 0 keeps it on the host. The optimizer
  state keeps ``torch.optim``'s own layout (integer parameter ids), so DDP, FSDP and single-process
  checkpoints resume each other.
- Resume. Every rank reads the full tensors and keeps its own shard (``distribute_tensor`` with no
  source rank: nothing is sent).
- EMA. The shadow is built from the sharded state dict, so each rank averages its shard; the update
  is the same element-wise lerp.
- Validation and previews run on rank 0 alone, so they need whole weights there: at those points
  every rank takes part in gathering the (EMA) weights into a plain copy of the model on rank 0
  (``gather_eval``), built once from a meta-device skeleton taken before sharding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime import World
from .fastpath import memory_format


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded one by one: UNet down/middle/up blocks and DiT blocks, wherever they sit
    (inside conditioning or ControlNet wrappers too); never one inside another."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents before children
        if id(module) in inside:
            continue
        found = [u for name in ("down_blocks", "up_blocks", "blocks") for u in (getattr(module, name, None) or [])]
        if isinstance(getattr(module, "middle_block", None), nn.Module):
            found.append(module.middle_block)
        for u in found:
            has_params = isinstance(u, nn.Module) and any(True for _ in u.parameters())
            if has_params and u is not model and id(u) not in inside:
                units.append(u)
                inside.update(id(m) for m in u.modules())
    return units


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A contiguous or channels-last tensor's elements as a 1-D view in the order they lie in memory (a
    channels-last tensor: a view of its NDHWC permutation). Parameters, buffers and their gradients are
    one of the two; anything else is refused rather than silently not written back."""
    cl = memory_format(t) is not torch.contiguous_format
    if not cl and not t.is_contiguous():
        raise ValueError(f"cannot all-reduce in place a tensor of strides {t.stride()}: neither contiguous nor "
                         "channels-last")
    return (t.movedim(1, -1) if cl else t).view(-1)


class Parallel:
    """How the Trainer's model is spread over the ranks; every method but ``sync_grads`` ("allreduce")
    is a no-op pass-through when the model is not sharded."""

    def __init__(self, world: World, device: torch.device, want: str = "auto", graphs: bool = False):
        """``graphs``: the training step is to be replayed from CUDA graphs, so DDP runs as "allreduce"."""
        self.world, self.device, self.want, self.graphs = world, torch.device(device), want, graphs
        self.kind = "none"
        self.eval_net: nn.Module | None = None  # FSDP: rank 0's full copy for validation and previews
        self._skeleton: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training step calls: the DDP wrapper, the (in place) sharded model, or the model."""
        from .planner import parallel_kind

        n = sum(p.numel() for p in model.parameters())
        self.kind = parallel_kind(self.want, self.world.size, n)
        if self.kind == "ddp" and self.graphs:
            self.kind = "allreduce"
        if self.kind == "allreduce":  # rank 0's initial weights and buffers everywhere, as DDP does
            with torch.no_grad():
                self._all(list(model.parameters()) + list(model.buffers()), torch.distributed.broadcast, src=0)
            return model
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients as views into the all-reduce buckets: no copy in and out of them each step (3d-pixel-128
            # on two H200s: 0.274 -> 0.250 s per step) and one parameter-sized buffer less
            return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            units = fsdp_units(model)
            if not units:
                raise ConfigError(f"train.parallel='fsdp' found no blocks to shard in {type(model).__name__}",
                                  "train.parallel", "use train.parallel=ddp for this model")
            if self.world.main:
                self._skeleton = _skeleton(model)
            mesh = init_device_mesh(self.device.type, (self.world.size,))
            for unit in units:
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    @staticmethod
    def _all(tensors: list[torch.Tensor], collective, **kw) -> None:
        """Run ``collective`` (in place) once per dtype over the tensors flattened into one buffer, and copy
        the results back. Each tensor enters in its memory order (channels-last weights and their gradients
        included: no reordering copy), and the results go back in one multi-tensor copy, not one kernel
        launch per parameter."""
        for dtype in {t.dtype for t in tensors}:
            views = [_memory_order(t) for t in tensors if t.dtype == dtype]
            flat = torch.cat(views)
            collective(flat, **kw)
            torch._foreach_copy_(views, flat.split([v.numel() for v in views]))

    def sync_grads(self, model: nn.Module) -> None:
        """"allreduce": average the gradients over the ranks (every rank calls it after each backward; a
        parameter without a gradient counts as zeros). Otherwise nothing: DDP and FSDP did it during the backward."""
        if self.kind != "allreduce":
            return
        grads = []
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)

        def mean(flat: torch.Tensor) -> None:
            torch.distributed.all_reduce(flat)
            flat.div_(self.world.size)

        self._all(grads, mean)

    # ---- full state for checkpoints -----------------------------------------------------------
    def _full(self, value):
        """``value`` with every DTensor gathered (on rank 0 to the host; elsewhere dropped)."""
        if isinstance(value, dict):
            return {k: self._full(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._full(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._full(v) for v in value)
        if _is_dtensor(value):
            full = value.full_tensor()  # a collective: every rank calls it, in the same order
            return full.cpu() if self.world.main else None
        return value

    def full_groups(self, model: nn.Module, opt, ema) -> dict:
        """The checkpoint groups {"model", "optimizer"[, "ema"]} with whole tensors. Under FSDP every rank
        must call it (the gathers are collectives); the result is meaningful on rank 0."""
        groups = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        if ema is not None:
            groups["ema"] = ema.shadow
        return self._full(groups) if self.sharded else groups

    # ---- resume -------------------------------------------------------------------------------
    def local_like(self, full: dict, template: dict) -> dict:
        """``full`` tensors cut into this rank's shards wherever ``template`` (a state dict) holds DTensors."""
        if not self.sharded:
            return full
        from torch.distributed.tensor import distribute_tensor

        out = {}
        for k, v in full.items():
            t = template.get(k)
            if _is_dtensor(t):
                v = distribute_tensor(v.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)
            out[k] = v
        return out

    def load_model(self, model: nn.Module, full: dict) -> None:
        model.load_state_dict(self.local_like(full, model.state_dict()))

    def load_optimizer(self, opt, state: dict) -> None:
        """Load a full optimizer state_dict; per-parameter tensors of a parameter's shape become shards like it."""
        if self.sharded:
            from torch.distributed.tensor import distribute_tensor

            params = [p for g in opt.param_groups for p in g["params"]]
            per = {}
            for i, entry in state["state"].items():
                p = params[int(i)]
                per[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                          if isinstance(v, torch.Tensor) and _is_dtensor(p) and tuple(v.shape) == tuple(p.shape)
                          else v for k, v in entry.items()}
            state = {**state, "state": per}
        opt.load_state_dict(state)

    # ---- rank 0's whole weights for validation and previews -------------------------------------
    def gather_eval(self, model: nn.Module, ema) -> None:
        """FSDP: every rank calls this before rank 0 validates or previews; rank 0 then holds the (EMA)
        weights whole in ``eval_net``. Otherwise nothing."""
        if not self.sharded:
            return
        source = ema.shadow if ema is not None else model.state_dict()
        if self.world.main and self.eval_net is None:
            self.eval_net = self._skeleton.to_empty(device=self.device)
            self._skeleton = None
        target = self.eval_net.state_dict() if self.world.main else {}
        with torch.no_grad():
            if self.world.main:  # buffers first (non-persistent ones are in no state dict); FSDP keeps them whole
                live = dict(model.named_buffers())
                for name, buf in self.eval_net.named_buffers():
                    if not _is_dtensor(live[name]):
                        buf.copy_(live[name])
            for k, v in source.items():
                full = v.full_tensor() if _is_dtensor(v) else v
                if self.world.main:
                    target[k].copy_(full)
