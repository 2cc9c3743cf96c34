"""Vector conditions on the UNet's time embedding (SYSTEM.md §3): modality id and tumour size bins.

A vector condition reaches the network as the **trailing constant channels** of its input (the
datasets write them as constant maps, data/datasets.py). ``ConditionedUNet`` splits them off, reduces
each to its value (spatial mean), feeds the remaining channels to the UNet and changes the time
embedding e (B, E), E = 4·channels[0]:

- ``AdditiveEmbedding`` (mode strategy ``full`` / ``dropout``; also the shape ScoreAug's 36-d omega
  embedding needs): e + MLP(v), MLP = Linear(in → E) → SiLU → Linear(E → E), last layer zero-initialised.
- ``FiLMEmbedding`` (mode strategy ``film``): e·(1 + scale) + shift with (scale, shift) = MLP(v) ∈ R^2E,
  last layer zero-initialised (γ = 1, β = 0 at start).
- ``SizeBinFiLM`` (``seg_conditioned``): per bin an Embedding(max_count + 1 → 32) of the count, the 7
  embeddings concatenated (224-d) → FiLM as above. ``improved``: 64-d per bin, MLP hidden 512, 4 layers.
- ``LateInjection`` (mode strategy ``late``): an MLP embeds v (E-d), and per UNet level ≥ ``start_level``
  plus the middle block a zero-initialised Linear(E → C_level) projects it to that level's channel
  count; the result is added to the level's output features (broadcast over space). The reference's
  version hooked only levels whose channel count equalled E, and the 2D UNet [128,256,256] has none,
  so it injected nothing (SYSTEM.md §12 item 8). Here every chosen level receives the embedding.
- ``none``: the vector channels are dropped; a plain UNet.

Every module starts as the identity (zero-initialised last layers), so a wrapped model computes the
plain UNet until it trains. The whole-batch zeroing of the ``dropout`` strategy is done by the trainer
(keyed by step) through ``vector_dropout``, so the model stays a pure function of its input.
"""

from __future__ import annotations

import torch
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from ..runtime import to_device

MODE_STRATEGIES = ("full", "dropout", "film", "late", "none")


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, zero_last: bool = True) -> nn.Sequential:
    """Linear → SiLU → … → Linear with ``layers`` Linear layers; the last one zero-initialised."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            mods.append(nn.SiLU())
    if zero_last:
        nn.init.zeros_(mods[-1].weight)
        nn.init.zeros_(mods[-1].bias)
    return nn.Sequential(*mods)


class AdditiveEmbedding(nn.Module):
    """e + MLP(v); zero-initialised, so the identity at start."""

    def __init__(self, in_dim: int, emb_dim: int):
        super().__init__()
        self.mlp = mlp(in_dim, emb_dim, emb_dim)

    def forward(self, emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return emb + self.mlp(v.to(emb.dtype)).to(emb.dtype)


class FiLMEmbedding(nn.Module):
    """e·(1 + scale) + shift, (scale, shift) = MLP(v); zero-initialised, so the identity at start."""

    def __init__(self, in_dim: int, emb_dim: int, hidden: int | None = None, layers: int = 2):
        super().__init__()
        self.mlp = mlp(in_dim, hidden or emb_dim, 2 * emb_dim, layers)

    def forward(self, emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mlp(v).to(emb.dtype).chunk(2, dim=-1)  # (B, E) each
        return emb * (1 + scale) + shift


class SizeBinFiLM(nn.Module):
    """FiLM of the time embedding by tumour counts per size bin; ``v`` holds count / max_count."""

    def __init__(self, emb_dim: int, n_bins: int = 7, max_count: int = 10, improved: bool = False):
        super().__init__()
        self.max_count = int(max_count)
        dim = 64 if improved else 32
        self.bins = nn.ModuleList([nn.Embedding(max_count + 1, dim) for _ in range(n_bins)])
        self.film = FiLMEmbedding(n_bins * dim, emb_dim, 512 if improved else emb_dim, 4 if improved else 2)

    def counts(self, v: torch.Tensor) -> torch.Tensor:
        return (v.float() * self.max_count).round().clamp(0, self.max_count).long()  # (B, n_bins)

    def forward(self, emb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.counts(v)
        e = torch.cat([table(c[:, k]) for k, table in enumerate(self.bins)], dim=-1)  # (B, n_bins·dim)
        return self.film(emb, e)


class LateInjection(nn.Module):
    """Per-level additive features from the vector: {level: (B, C_level)} and "mid"."""

    def __init__(self, in_dim: int, emb_dim: int, channels: list[int], start_level: int):
        super().__init__()
        self.embed = mlp(in_dim, emb_dim, emb_dim, zero_last=False)
        self.levels = [i for i in range(len(channels)) if i >= start_level]
        self.proj = nn.ModuleDict({str(i): nn.Linear(emb_dim, channels[i]) for i in self.levels})
        self.proj["mid"] = nn.Linear(emb_dim, channels[-1])
        for lin in self.proj.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, v: torch.Tensor) -> dict:
        e = torch.nn.functional.silu(self.embed(v))
        return {k: lin(e) for k, lin in self.proj.items()}


def _add(h: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    return h + feat.to(h.dtype).reshape(*feat.shape, *([1] * (h.ndim - 2)))


class ConditionedUNet(nn.Module):
    """A medgen ``UNet`` whose last ``n_vector`` input channels are a constant-map vector condition."""

    def __init__(self, unet: nn.Module, n_vector: int, modulator: nn.Module | None = None,
                 late: LateInjection | None = None, vector_dropout: float = 0.0):
        super().__init__()
        self.unet, self.n_vector, self.modulator, self.late = unet, int(n_vector), modulator, late
        self.vector_dropout = float(vector_dropout)  # trainer: p of zeroing a whole batch's vector

    @property
    def middle_block(self) -> nn.Module:
        """The UNet's middle block (training tricks hook it)."""
        return self.unet.middle_block

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_in + n_vector, …) → maps (B, C_in, …) and the vector (B, n_vector) float32."""
        n = x.shape[1] - self.n_vector
        return x[:, :n], x[:, n:].float().flatten(2).mean(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, v = self.split(x)
        u = self.unet
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        emb = get_timestep_embedding(t, u.block_out_channels[0]).to(x.dtype)  # (B, C0)
        emb = u.time_embed(emb)  # (B, E)
        if self.modulator is not None:
            emb = self.modulator(emb, v)
        inject = self.late(v) if self.late is not None else {}
        h = u.conv_in(x)
        skips = [h]
        for i, block in enumerate(u.down_blocks):
            h, res = u._run(block, hidden_states=h, temb=emb)
            skips.extend(res)
            if str(i) in inject:  # the next level (or the middle block) sees the injected features
                h = _add(h, inject[str(i)])
        h = u._run(u.middle_block, hidden_states=h, temb=emb)
        if "mid" in inject:
            h = _add(h, inject["mid"])
        for block in u.up_blocks:
            n = len(block.resnets)
            skips, res = skips[:-n], skips[-n:]
            h = u._run(block, hidden_states=h, res_hidden_states_list=res, temb=emb)
        return u.out(h)


def wrap(unet: nn.Module, mode: str, channels: list[int], mode_embedding: str = "full", mode_dropout: float = 0.2,
         late_start_level: int = 2, size_bins: str = "film", max_count: int = 10) -> nn.Module:
    """The model of ``mode``: ``unet`` itself, or a ``ConditionedUNet`` around it."""
    emb_dim = 4 * int(channels[0])
    if mode == "seg_conditioned":
        return ConditionedUNet(unet, 7, SizeBinFiLM(emb_dim, 7, max_count, improved=size_bins == "film-improved"))
    if mode != "multi":
        return unet
    if mode_embedding not in MODE_STRATEGIES:
        raise ValueError(f"unknown mode embedding '{mode_embedding}'")
    if mode_embedding in ("full", "dropout"):
        return ConditionedUNet(unet, 4, AdditiveEmbedding(4, emb_dim),
                               vector_dropout=mode_dropout if mode_embedding == "dropout" else 0.0)
    if mode_embedding == "film":
        return ConditionedUNet(unet, 4, FiLMEmbedding(4, emb_dim))
    if mode_embedding == "late":
        return ConditionedUNet(unet, 4, late=LateInjection(4, emb_dim, list(channels), late_start_level))
    return ConditionedUNet(unet, 4)


# --- ScoreAug omega embedding -------------------------------------------------------------
OMEGA_DIM = 36
OMEGA_MODE_DIMS = slice(32, 36)  # modality one-hot under mode intensity scaling
N_MODALITIES = 4
MODE_INTENSITY = (0.85, 1.15, 0.92, 1.08)  # bravo, flair, t1_pre, t1_gd (mode ids 0..3), SYSTEM.md §5


def _time_embedding(model: nn.Module) -> nn.Module:
    """The module whose output is the time embedding e (B, E): UNet ``time_embed``, DiT ``t_embed``."""
    inner = getattr(model, "unet", model)  # ConditionedUNet → its UNet
    for name in ("time_embed", "t_embed"):
        if isinstance(getattr(inner, name, None), nn.Module):
            return getattr(inner, name)
    raise ValueError(f"{type(model).__name__} has no time embedding to receive the ScoreAug omega")


class OmegaConditioned(nn.Module):
    """Adds MLP(omega) to the wrapped network's time embedding; ``forward(x, t, omega=None)``.

    ``omega`` (B, 36) or (36,) is the ScoreAug encoding (engine/scoreaug.py); None — validation and
    generation — is the identity encoding: zeros, or dim 0 = 1 with ``identity_flag`` (the reference's
    encoding, ``compat.scoreaug_identity_flag``). The MLP (AdditiveEmbedding, last layer zero-initialised)
    is applied by a forward hook on the time-embedding module, so the inner network is unchanged (a
    ConditionedUNet's mode/size-bin modulation then acts on e + MLP(omega)).

    Mode intensity scaling (``train.scoreaug.mode_intensity``, multi mode; ``mode_intensity_channels`` =
    the image channels): in every call the first that many input channels (the noisy image) are scaled by
    the sample's modality factor ``MODE_INTENSITY`` — read from the trailing 4 one-hot modality maps —
    and omega dims 32–35 carry that one-hot, whatever the transform (identity included). A sample whose
    modality maps were zeroed (condition dropout, the "dropout" mode strategy, CFG's unconditional
    branch) gets factor 1 and zeros there. The target is not scaled, so the network has to use the
    modality to predict it."""

    def __init__(self, model: nn.Module, identity_flag: bool = False, mode_intensity_channels: int = 0):
        super().__init__()
        self.model, self.identity_flag = model, bool(identity_flag)
        self.mode_intensity_channels = int(mode_intensity_channels)
        target = _time_embedding(model)
        emb_dim = [m for m in target.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.omega_embed = AdditiveEmbedding(OMEGA_DIM, emb_dim)
        self._omega: torch.Tensor | None = None
        target.register_forward_hook(self._hook)

    def identity(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        v = torch.zeros(batch, OMEGA_DIM, device=device, dtype=dtype)
        if self.identity_flag:
            v[:, 0] = 1.0
        return v

    def _hook(self, module, args, out):
        om = self._omega
        om = self.identity(out.shape[0], out.device) if om is None else om.reshape(-1, OMEGA_DIM)
        return self.omega_embed(out, to_device(om, out.device).expand(out.shape[0], -1))

    def scale_by_mode(self, x: torch.Tensor, omega: torch.Tensor | None):
        """(x with its image channels scaled by the modality factor, omega (B, 36) with dims 32–35 = one-hot)."""
        n, b = self.mode_intensity_channels, x.shape[0]
        onehot = x[:, -N_MODALITIES:].float().flatten(2).mean(-1)  # (B, 4): one-hot, or zeros when dropped
        table = to_device(torch.tensor(MODE_INTENSITY, dtype=torch.float32), x.device)
        scale = 1.0 + onehot @ (table - 1.0)  # (B,): the modality's factor, 1 without a modality
        scaled = x[:, :n] * scale.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        om = self.identity(b, x.device) if omega is None else to_device(omega.reshape(-1, OMEGA_DIM), x.device).float()
        om = om.expand(b, -1).clone()
        om[:, OMEGA_MODE_DIMS] = onehot
        return torch.cat([scaled, x[:, n:]], dim=1), om

    def forward(self, x: torch.Tensor, t: torch.Tensor, omega: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode_intensity_channels:
            x, omega = self.scale_by_mode(x, omega)
        self._omega = omega
        try:
            return self.model(x, t)
        finally:
            self._omega = None

    # what the trainer and tricks read from the network
    @property
    def middle_block(self) -> nn.Module:
        return self.model.middle_block

    @property
    def n_vector(self) -> int:
        return int(getattr(self.model, "n_vector", 0))

    @property
    def vector_dropout(self) -> float:
        return float(getattr(self.model, "vector_dropout", 0.0))
