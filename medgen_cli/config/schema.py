"""The preset schema: every key a preset may set, its type, default and meaning. No torch.

Sections follow CONTRACTS.md: [data] [model] [diffusion] [train] [sample] [eval] [chain] [compat].
Units follow the reference: training length, warm-up, validation and checkpoint cadence in epochs.
`kind` strings discriminate alternatives (model family, diffusion strategy).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODES = ("bravo", "seg", "dual", "multi", "seg_conditioned", "seg_conditioned_input")
STAGES = ("synth", "train", "sample", "eval", "report")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    root: Optional[str] = None  # dataset root (BrainMetShare layout); `--data DIR` sets it
    dims: Literal[2, 3] = 2  # 2 = axial slices, 3 = volumes
    # What is generated (SYSTEM.md §3): bravo (image | its mask), seg (masks alone), dual (t1_pre + t1_gd |
    # mask), multi (one of 4 modalities | mask + modality id), seg_conditioned (mask | 7 size bins, FiLM),
    # seg_conditioned_input (mask | 7 size bins as constant input maps).
    mode: Literal["bravo", "seg", "dual", "multi", "seg_conditioned", "seg_conditioned_input"] = "bravo"
    # 2D slice augmentation (hflip p 0.5, integer shift up to 20 % x / 10 % y): "static" draws one
    # transform per slice when the slice list is built (what the reference ran, "aug on"); "dynamic"
    # draws a new one per epoch and item (the intended mechanism).
    augment: Literal["none", "static", "dynamic"] = "none"
    image_size: int = Field(128, ge=8)  # in-plane size after resize (square)
    depth: int = Field(150, ge=1)  # original slice count; outputs are trimmed back to it
    pad_depth_to: int = Field(160, ge=1)  # 3D only: depth after padding (divisible by the UNet)
    pad_mode: Literal["replicate", "constant"] = "replicate"
    normalization: Literal["minmax", "global_percentile"] = "minmax"
    spacing: Optional[tuple[float, float, float]] = None  # (x, y, z) mm override of the header
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: Optional[str] = None  # preprocessed cache; default $MEDGEN_CACHE or ~/.cache/medgen
    # Loader processes reading training batches ahead of the step. None (auto): 2 for 3D on a GPU (each
    # step reads a volume), else 0 (2D slices are held in memory; the CPU is busy computing).
    num_workers: Optional[int] = Field(None, ge=0)

    def workers(self, cuda: bool) -> int:
        """``num_workers``, or the automatic choice for a run on CUDA (``cuda``) or the CPU."""
        if self.num_workers is not None:
            return self.num_workers
        return 2 if cuda and self.dims == 3 else 0


class UNetConfig(Strict):
    """MONAI DiffusionModelUNet (SYSTEM.md §4)."""

    kind: Literal["unet"] = "unet"
    channels: list[int] = [128, 256, 256]
    attention_levels: list[bool] = [False, True, True]
    num_res_blocks: Union[int, list[int]] = 1
    num_head_channels: Union[int, list[int]] = 256
    norm_num_groups: int = 32
    gradient_checkpointing: bool = False
    # Self-attention through torch's scaled_dot_product_attention (memory-efficient/flash kernels) instead
    # of MONAI's materialised score matrix: same parameters, outputs equal to ~1e-6; at 2D 256 px the
    # materialised 16384^2 scores do not fit a batch of 16 on one GPU.
    sdpa_attention: bool = True

    @model_validator(mode="after")
    def _levels_agree(self):
        n = len(self.channels)
        for name in ("attention_levels", "num_res_blocks", "num_head_channels"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries but channels has {n} levels")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        return self

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)


class DiTConfig(Strict):
    """DiT/SiT transformer on patch tokens (models/dit.py; SYSTEM.md §4). "SiT" = DiT trained with rflow."""

    kind: Literal["dit"] = "dit"
    # hidden/depth/heads: S 384/12/6, B 768/12/12, L 1024/24/16, XL 1152/28/16
    variant: Literal["S", "B", "L", "XL"] = "S"
    patch_size: Literal[1, 2, 4, 8, 16] = 2  # patchify conv kernel = stride
    hidden_size: Optional[int] = Field(None, ge=8)  # overrides the variant's width (tiny test models)
    depth: Optional[int] = Field(None, ge=1)  # overrides the variant's block count
    num_heads: Optional[int] = Field(None, ge=1)  # overrides the variant's head count
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = True  # LayerNorm on queries and keys per head
    drop_rate: float = Field(0.0, ge=0, lt=1)  # dropout in attention (weights and projection) and MLP
    drop_path_rate: float = Field(0.0, ge=0, lt=1)  # stochastic depth, rising linearly 0 -> this over the blocks
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self):
        widths = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "XL": (1152, 16)}[self.variant]
        e, h = self.hidden_size or widths[0], self.num_heads or widths[1]
        if e % h:
            raise ValueError(f"hidden_size {e} is not divisible by num_heads {h}")
        return self

    @property
    def downsampling(self) -> int:
        return self.patch_size


ModelConfig = Annotated[Union[UNetConfig, DiTConfig], Field(discriminator="kind")]


class RFlowConfig(Strict):
    """Rectified flow in the MONAI convention (t=0 clean, t=1 noise, v = x0 - noise)."""

    kind: Literal["rflow"] = "rflow"
    num_train_timesteps: int = Field(1000, ge=1)
    continuous: bool = True
    t_sampling: Literal["logit-normal", "uniform"] = "logit-normal"
    shift: float = Field(1.0, gt=0)  # resolution shift r: t' = r t / (1 + (r-1) t); 1 = identity
    prediction: Literal["velocity", "sample"] = "velocity"


class DDPMConfig(Strict):
    kind: Literal["ddpm"] = "ddpm"
    num_train_timesteps: int = Field(1000, ge=2)
    schedule: Literal["cosine", "linear_beta"] = "cosine"
    prediction: Literal["epsilon", "sample"] = "epsilon"
    clip_sample: bool = False
    # DDIM time grid: "leading" starts at T - T//N (well conditioned with the cosine schedule);
    # "linspace" starts at T-1 like current MONAI, where cosine's alpha_bar ~ 2e-9 amplifies errors.
    ddim_spacing: Literal["leading", "linspace"] = "leading"


DiffusionConfig = Annotated[Union[RFlowConfig, DDPMConfig], Field(discriminator="kind")]


class EMAConfig(Strict):
    enabled: bool = False
    decay: float = Field(0.9999, gt=0, lt=1)
    start_step: int = Field(100, ge=0)  # first optimizer step that updates the EMA
    every: int = Field(10, ge=1)  # update interval in optimizer steps


class SpikeSkipConfig(Strict):
    """Skip the optimizer step when the pre-clip gradient norm exceeds factor x its running mean."""

    factor: float = Field(10.0, gt=1)
    decay: float = Field(0.99, gt=0, lt=1)  # running mean of min(norm, factor x mean): spikes cannot poison it
    warmup: int = Field(100, ge=0)  # steps before skipping can start


class CurriculumConfig(Strict):
    """Timestep curriculum (rflow): t uniform in [0, m], m rising linearly from start_max to 1."""

    epochs: int = Field(50, ge=1)
    start_max: float = Field(0.3, gt=0, le=1)


class SAMConfig(Strict):
    """Sharpness-aware minimisation (two gradient passes); adaptive = ASAM (scaled by |w|)."""

    rho: float = Field(0.05, gt=0)
    adaptive: bool = False


# --- scoreaug/sda, regional weighting, compile ---
class ScoreAugConfig(Strict):
    """ScoreAug (engine/scoreaug.py): one transform per batch on the noisy input, condition and target."""

    mode: Literal["single", "compose", "v2"] = "single"  # v1: one of identity/enabled; compose; v2 (+16 patterns)
    rotation: bool = True  # in-plane rot90 (3D: about the D axis)
    flip: bool = True  # flips (2D h/v, with rotation the full D4 group; 3D D/H/W)
    translation: bool = True  # 2D ±40 % x / ±20 % y; 3D 0/±20/±40 % per axis; zero padded
    cutout: bool = True  # a rectangle of 10-30 % of each side
    brightness: Optional[float] = Field(None, gt=1)  # B: scale the image by s in [1/B, B] (exp9_2: 1.2)
    compose_prob: float = Field(0.5, gt=0, le=1)  # compose: probability of each transform
    omega: bool = True  # feed the 36-d omega encoding to the time embedding (zero-init MLP)
    # multi mode: the noisy image channels are scaled by the sample's modality factor (bravo 0.85, flair 1.15,
    # t1_pre 0.92, t1_gd 1.08) in every network call (training, validation, sampling), the target is not, and
    # omega dims 32-35 carry the modality one-hot: the network must use the modality to predict (SYSTEM.md §5)
    mode_intensity: bool = False

    @model_validator(mode="after")
    def _something_enabled(self):
        if not (self.rotation or self.flip or self.translation or self.cutout or self.brightness
                or self.mode == "v2"):
            raise ValueError("ScoreAug with every transform disabled would train on identity only")
        return self


class SDAConfig(Strict):
    """Shifted data augmentation (engine/sda.py): an extra loss branch on rot90/flipped batches."""

    prob: float = Field(0.5, gt=0, le=1)  # probability per batch of the augmented branch
    noise_shift: float = Field(0.1, ge=0, le=1)  # δ added to the normalised time t of the branch
    weight: float = Field(1.0, gt=0)  # the branch's MSE is added with this weight


class RegionalWeightConfig(Strict):
    """Per-pixel MSE weights by tumour size (RANO-BM class of each component of the mask)."""

    tiny: float = Field(2.5, gt=0)
    small: float = Field(1.8, gt=0)
    medium: float = Field(1.4, gt=0)
    large: float = Field(1.2, gt=0)
    background: float = Field(1.0, gt=0)
    fov_mm: float = Field(240.0, gt=0)  # in-plane pixel size = fov_mm / image size (the reference's scale)


class TrainConfig(Strict):
    epochs: int = Field(500, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)  # cap on optimizer steps (`--max-steps`)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
    warmup_epochs: float = Field(5, ge=0)  # linear warm-up from 0.1x to 1x
    eta_min: float = Field(1e-6, ge=0)  # cosine floor; also the plateau schedule's minimum
    plateau_factor: float = Field(0.5, gt=0, lt=1)  # plateau: LR x factor after `patience` flat validations
    plateau_patience: int = Field(10, ge=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema: EMAConfig = EMAConfig()
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU, loss in fp32; fp32 on CPU
    device: str = "auto"
    seed: int = 42
    val_every: int = Field(1, ge=1)  # epochs
    ckpt_every: int = Field(1, ge=1)  # epochs
    ckpt_every_steps: Optional[int] = Field(None, ge=1)  # extra checkpoints inside long epochs
    keep_last: int = Field(3, ge=1)
    preview_every: int = Field(10, ge=0)  # epochs; 0 = never
    log_every: int = Field(50, ge=1)  # optimizer steps
    val_max_items: Optional[int] = Field(None, ge=1)  # cap validation cost on big splits
    # Regularisation and tricks (SYSTEM.md §5); all off by default.
    min_snr_gamma: Optional[float] = Field(None, gt=0)  # loss weight min(SNR, gamma) / SNR
    grad_noise: float = Field(0.0, ge=0)  # sigma: N(0, (sigma / (1 + step)^0.55)^2) added after clipping
    noise_augmentation: float = Field(0.0, ge=0)  # noise' = (noise + s z) / sqrt(1 + s^2)
    timestep_jitter: float = Field(0.0, ge=0)  # rflow: t += N(0, s^2), clamped to [0, 1]
    curriculum: Optional[CurriculumConfig] = None
    spike_skip: Optional[SpikeSkipConfig] = None
    feature_perturbation: float = Field(0.0, ge=0)  # std of noise added to the UNet middle block in training
    sam: Optional[SAMConfig] = None
    # Per-sample probability of zeroing the whole condition (mask channel, size-bin / mode maps) in
    # training, keyed by (seed, step, sample); what classifier-free guidance's unconditional branch needs.
    cond_dropout: float = Field(0.0, ge=0, lt=1)
    # --- scoreaug/sda ---
    scoreaug: Optional[ScoreAugConfig] = None  # mutually exclusive with sda
    sda: Optional[SDAConfig] = None
    regional_weighting: Optional[RegionalWeightConfig] = None  # bravo/dual/multi: from the mask; seg modes: target
    compile: bool = False  # torch.compile the network for training
    # torch.compile's mode: "reduce-overhead" also replays the forward and backward from CUDA graphs (on CUDA:
    # a step stops waiting for ~1,200 kernel launches; costs a private memory pool; not with FSDP).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Several processes (torchrun): "ddp" replicates the model (gradients all-reduced from DDP's hooks during
    # the backward); "allreduce" replicates it too and averages the gradients in one all-reduce after the
    # backward (what "ddp" becomes under compile_mode="reduce-overhead", whose CUDA graphs cannot hold DDP's
    # hooks); "fsdp" shards parameters, gradients, AdamW state and EMA (FSDP2, engine/parallel.py); "auto" =
    # FSDP above 1e9 parameters, else DDP. One process: no wrapper ("fsdp" is refused there).
    parallel: Literal["auto", "ddp", "allreduce", "fsdp"] = "auto"
    # Self-conditioning (Chen et al. 2022, "Analog Bits"; engine/selfcond.py): "x0" gives the network as many
    # extra input channels as the image has, holding the previous clean estimate x̂0 (zeros when absent).
    # Training: per sample with p = self_conditioning_prob (keyed by seed, step, sample) a no-grad forward
    # with zeros gives x̂0, detached and fed to the real forward; otherwise zeros. Sampling: each network
    # evaluation receives the previous evaluation's x̂0 (zeros first). The reference's "consistency" variant
    # (a second no-grad forward on the identical input, + weight x MSE to it) is a no-op for a deterministic
    # UNet; it is refused, never silently run. (DDPM ε-prediction: x̂0 near t = T is unbounded unless
    # diffusion.clip_sample.)
    self_conditioning: Optional[Literal["x0", "consistency"]] = None
    self_conditioning_prob: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _refuse_consistency(self):
        if self.self_conditioning == "consistency":
            raise ValueError("self_conditioning='consistency' (reference exp25_1) compares the network with a "
                             "second no-grad forward on the identical input: for a deterministic UNet the term "
                             "is ~0, so it would be a silently ignored option; medgen refuses it. Use "
                             "self_conditioning = \"x0\" (Chen et al.: the previous x0 estimate as extra input "
                             "channels; preset 2d-pixel-128-selfcond)")
        return self


class SampleConfig(Strict):
    solver: Optional[str] = None  # None: the strategy's own (euler for rflow, ddim for ddpm)
    steps: int = Field(25, ge=1)
    n: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 42  # noise of output i is drawn from seed + i
    cfg: float = 1.0  # classifier-free guidance w (1 = off); at t = 1 when cfg_end is set
    cfg_end: Optional[float] = None  # dynamic CFG: w goes linearly from cfg (t = 1) to cfg_end (t = 0)
    atol: Optional[float] = Field(None, gt=0)  # adaptive solvers only (default 1e-5)
    rtol: Optional[float] = Field(None, gt=0)
    grid: Union[Literal["train", "uniform"], float] = "train"  # time grid: training shift, uniform, or ratio r
    restart: Optional[tuple[int, int, float, float]] = None  # Restart (K, n, t_min, t_max); Euler only
    state_dtype: Literal["fp32", "bf16"] = "fp32"  # solver state; times stay fp64, the net runs under autocast
    split: str = "val"  # bravo mode: condition on the first n sorted masks of this split
    weights: Literal["ema", "raw"] = "ema"
    which: str = "best"
    max_tumour_fraction: float = Field(0.04, gt=0, le=1)  # paired: reject masks with a slice above this
    max_retries: int = Field(10, ge=0)  # paired: redraws of a rejected generated mask
    compile: bool = False  # fast path (engine/fastpath.py): bf16 weights, channels-last, torch.compile, CUDA graphs

    @model_validator(mode="after")
    def _grid_ratio(self):
        if isinstance(self.grid, float) and self.grid <= 0:
            raise ValueError("grid ratio must be > 0")
        return self


class EvalConfig(Strict):
    # one-step x0 metrics; "perceptual-radimagenet" is the reference's "LPIPS" (SYSTEM.md §9)
    metrics: list[Literal["psnr", "msssim", "ssim", "lpips", "perceptual-radimagenet"]] = ["psnr", "msssim"]
    split: str = "val"  # split for one-step x0 reconstruction metrics
    max_items: Optional[int] = Field(None, ge=1)


class SynthConfig(Strict):
    n_train: int = Field(6, ge=1)
    n_val: int = Field(2, ge=1)
    n_test: int = Field(2, ge=1)
    size: int = Field(256, ge=16)
    depth: int = Field(150, ge=4)
    seed: int = 0


class ChainConfig(Strict):
    stages: list[Literal["synth", "train", "sample", "eval", "report"]] = []
    synth: SynthConfig = SynthConfig()


class CompatConfig(Strict):
    """Reference quirks, reproduced only on request (SYSTEM.md §12); all off by default."""

    sampled_feret: bool = False  # size bins from a random voxel subset, as the reference computed
    min_snr_rflow_unsquared: bool = False  # rflow SNR = (1-t)/t, as the reference's code before 2026-01-18
    # rflow resolution shift from the pixel size, as the reference computed it: r = 1/2 in s2d/wavelet
    # spaces (SYSTEM.md §2, §12.9: unintended, skews training and sampling to low noise); multiplies diffusion.shift
    pixel_base_shift: bool = False
    # --- scoreaug/sda ---
    scoreaug_identity_flag: bool = False  # ScoreAug identity/generation omega = dim 0 set (the pre-fix leak)
    sda_untransformed_condition: bool = False  # SDA: the mask is not transformed with the image
    sda_shift_clamp_bug: bool = False  # SDA: t·T + δ clamped to [0, 1], i.e. every augmented sample at t ≈ 1/T
    bf16_loss: bool = False  # MSE computed in bfloat16 (exp2_bf16mse: use_fp32_loss=false)
    # --- size-bin spacing, mixed multi batches, perceptual validation loss ---
    # Size bins with the spacing the reference's 3D modes hard-coded, (D, H, W) = (1.0, 0.9375, 0.9375) mm,
    # whatever the image size; at 128 px the true in-plane spacing is 1.875 mm, so tumours land in smaller
    # bins (3D exp2 / exp2b / exp2c). Off: the true geometry (data.spacing or the header, resized).
    reference_bin_spacing: bool = False
    # multi mode: batches mix modalities and the whole batch takes the first sample's modality id, as before
    # the reference's January-2026 homogeneous-batch fix (exp10_1-exp10_3, launched 2025-12-26/27).
    first_mode_batches: bool = False
    # Validation loss = MSE + 0.001 x RadImageNet-ResNet50 perceptual distance of the one-step x̂0 (2D runs
    # launched before 2026-01-18). Needs RadImageNet-ResNet50_notop.pth ($MEDGEN_WEIGHTS_RADIMAGENET_RESNET50,
    # $MEDGEN_WEIGHTS_DIR or the torch hub checkpoints folder); without it training warns and logs the plain MSE.
    val_perceptual: bool = False


class SpaceStats(Strict):
    """Per-channel (sub-band) statistics of the encoded training images; written at the start of training."""

    mean: list[float]
    std: list[float]
    items: int = Field(ge=1)  # training items they were estimated from

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.mean) != len(self.std) or any(v <= 0 for v in self.std):
            raise ValueError("stats.mean and stats.std need the same length and std > 0")
        return self


class SpaceConfig(Strict):
    """What the model sees (spaces.py): pixels, lossless space-to-depth 2x per axis, or a Haar wavelet level."""

    kind: Literal["pixel", "s2d", "wavelet"] = "pixel"
    rescale: bool = False  # images [0, 1] -> [-1, 1] before the transform (conditions are not rescaled)
    normalize: bool = False  # wavelet: standardise each sub-band with stats from <= normalize_items training items
    normalize_items: int = Field(200, ge=1, le=200)
    stats: Optional[SpaceStats] = None  # filled when training starts; sampling and eval reuse it

    @model_validator(mode="after")
    def _options_fit_kind(self):
        if self.normalize and self.kind != "wavelet":
            raise ValueError("space.normalize is defined for the wavelet space")
        if self.stats is not None and not self.normalize:
            raise ValueError("space.stats is only used with space.normalize = true")
        return self

    @property
    def factor(self) -> int:
        return 1 if self.kind == "pixel" else 2


class ConditioningConfig(Strict):
    """Vector conditions on the UNet time embedding (models/conditioning.py; SYSTEM.md §3)."""

    # multi mode: full (additive), dropout (full + whole-batch zeroing), film, late, none
    mode_embedding: Literal["full", "dropout", "film", "late", "none"] = "full"
    mode_dropout: float = Field(0.2, ge=0, le=1)  # "dropout" strategy: p of zeroing a batch's mode encoding
    late_start_level: int = Field(2, ge=0)  # "late": first UNet level that receives the mode embedding
    size_bins: Literal["film", "film-improved"] = "film"  # seg_conditioned: 32-d/1 hidden or 64-d/512x4
    max_count: int = Field(10, ge=1)  # tumour count per bin is clamped to this


# --- controlnet and DiffRS ---
class ControlNetConfig(Strict):
    """ControlNet two-stage training (models/controlnet.py; SYSTEM.md §3). stage 0 = off."""

    stage: Literal[0, 1, 2] = 0  # 1: UNet alone, unconditional (in = out); 2: + ControlNet on the mask
    stage1_run: Optional[str] = None  # stage 2: the stage-1 run (run folder, step folder or .safetensors)
    stage1_which: str = "best"  # stage-1 checkpoint: best | latest | step-N
    stage1_weights: Literal["ema", "raw"] = "ema"  # EMA weights when the stage-1 step has them
    freeze_unet: bool = True  # false: train UNet and ControlNet jointly
    conditioning_scale: float = Field(1.0, ge=0)  # multiplies every ControlNet residual
    embedding_channels: list[int] = [16]  # mask embedding at pixel resolution before the zero conv
    copy_encoder: bool = True  # initialise the ControlNet encoder from the stage-1 UNet encoder
    # Written when stage 2 starts (the pointer to the frozen weights): step folder and sha256 of its
    # model index file (which lists each shard's sha256); which weights ("ema" | "raw") were taken.
    stage1_checkpoint: Optional[str] = None
    stage1_sha256: Optional[str] = None
    stage1_loaded: Optional[str] = None


class DiffRSConfig(Strict):
    """DiffRS discriminator head (models/diffrs.py, engine/diffrs.py; SYSTEM.md §9). Off unless enabled."""

    enabled: bool = False  # `medgen train` trains the head instead of the diffusion model
    run: Optional[str] = None  # the frozen diffusion model (run folder, step folder or .safetensors)
    which: str = "best"
    weights: Literal["ema", "raw"] = "ema"
    fake: Optional[str] = None  # generated samples: a `medgen sample` output folder (OUT/<i>/bravo.nii.gz …)
    fake_val: Optional[str] = None  # generated samples for validation (with data.val_split as real)
    width: int = Field(128, ge=8)  # head channels
    norm_num_groups: int = Field(32, ge=1)
    # Written when head training starts: the diffusion checkpoint used and the sha256 of its model index.
    checkpoint: Optional[str] = None
    sha256: Optional[str] = None


class Preset(Strict):
    name: str = ""  # filled by the loader
    description: str = ""
    experiment: str = ""  # reference experiment id (reference/EXPERIMENTS.md)
    data: DataConfig = DataConfig()
    model: ModelConfig = UNetConfig()
    diffusion: DiffusionConfig = RFlowConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    chain: ChainConfig = ChainConfig()
    compat: CompatConfig = CompatConfig()
    space: SpaceConfig = SpaceConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    controlnet: ControlNetConfig = ControlNetConfig()
    diffrs: DiffRSConfig = DiffRSConfig()  # issue 4

    @model_validator(mode="after")
    def _sizes_fit_model(self):
        f = self.model.downsampling * self.space.factor  # the space halves each axis before the model
        what = "the model's down-sampling factor" if self.space.factor == 1 else \
            f"the {self.space.kind} space's 2 x the model's down-sampling factor"
        if self.data.image_size % f:
            raise ValueError(f"data.image_size={self.data.image_size} is not divisible by {what} {f}")
        if self.data.dims == 3:
            if self.data.pad_depth_to % f:
                raise ValueError(f"data.pad_depth_to={self.data.pad_depth_to} is not divisible by {what} {f}")
            if self.data.pad_depth_to < self.data.depth:
                raise ValueError("data.pad_depth_to is smaller than data.depth")
        return self

    @model_validator(mode="after")
    def _tricks_fit_strategy(self):
        t = self.train
        if self.diffusion.kind != "rflow" and (t.curriculum or t.timestep_jitter):
            raise ValueError("train.curriculum and train.timestep_jitter are defined for rflow only")
        if t.feature_perturbation and self.model.kind != "unet":
            raise ValueError("train.feature_perturbation needs a UNet (it perturbs the middle block)")
        return self

    @model_validator(mode="after")
    def _space_fits(self):
        sp = self.space
        if sp.kind != "pixel" and self.vector_channels():
            raise ValueError(f"space.kind={sp.kind!r} transforms condition maps; data.mode={self.data.mode!r} "
                             "carries vector conditions (use the pixel space)")
        if sp.stats is not None:
            want = self.channels()[0] * sp.factor ** self.data.dims
            if len(sp.stats.mean) != want:
                raise ValueError(f"space.stats has {len(sp.stats.mean)} channels, the {sp.kind} space of this "
                                 f"mode has {want}")
        if self.compat.pixel_base_shift and self.diffusion.kind != "rflow":
            raise ValueError("compat.pixel_base_shift is an rflow timestep transform")
        return self

    @model_validator(mode="after")
    def _modes_fit(self):
        d, c = self.data, self.conditioning
        if d.augment != "none" and d.dims != 2:
            raise ValueError("data.augment applies to 2D slices (dims = 2)")
        if self.vector_channels() and self.model.kind != "unet":
            raise ValueError(f"data.mode={d.mode!r} conditions the UNet time embedding; model.kind must be 'unet'")
        if self.vector_channels() and getattr(getattr(self, "space", None), "kind", "pixel") != "pixel":
            raise ValueError(f"data.mode={d.mode!r} passes its vector condition as constant maps; use space.kind='pixel'")
        if d.mode == "multi" and c.mode_embedding == "late" and c.late_start_level >= len(self.model.channels):
            raise ValueError(f"conditioning.late_start_level={c.late_start_level} but the UNet has "
                             f"{len(self.model.channels)} levels")
        return self


    # --- controlnet and DiffRS ---
    @model_validator(mode="after")
    def _controlnet_diffrs_fit(self):
        cn, dr = self.controlnet, self.diffrs
        plain = self.model.kind == "unet" and not self.vector_channels() and self.space.kind == "pixel"
        if cn.stage:
            if not plain or self.data.mode not in ("bravo", "dual"):
                raise ValueError("controlnet needs a UNet in pixel space and a mask-conditioned mode "
                                 f"(bravo or dual), not model.kind={self.model.kind!r} data.mode={self.data.mode!r}")
            if cn.stage == 1 and cn.stage1_run:
                raise ValueError("controlnet.stage1_run names the stage-1 run of a stage-2 preset (stage = 2)")
        if dr.enabled:
            if not plain or cn.stage or self.diffusion.kind != "rflow":
                raise ValueError("diffrs needs a plain UNet rflow model in pixel space (no vector condition, "
                                 "no ControlNet)")
            if self.data.mode == "seg":
                raise ValueError("diffrs trains on real images with their masks: use a mask-conditioned mode")
        return self

    # --- scoreaug/sda ---
    @model_validator(mode="after")
    def _augmentations_fit(self):
        t, c = self.train, self.compat
        if t.scoreaug is not None and t.sda is not None:
            raise ValueError("train.scoreaug and train.sda are mutually exclusive (both augment the diffusion "
                             "batch); choose one")
        if (t.scoreaug or t.sda or t.regional_weighting) and self.space.kind != "pixel":
            raise ValueError(f"ScoreAug, SDA and regional weighting act on pixels; space.kind={self.space.kind!r}")
        if (c.sda_untransformed_condition or c.sda_shift_clamp_bug) and t.sda is None:
            raise ValueError("compat.sda_* options need train.sda")
        if c.scoreaug_identity_flag and (t.scoreaug is None or not t.scoreaug.omega):
            raise ValueError("compat.scoreaug_identity_flag needs train.scoreaug with omega = true")
        return self

    # --- self-conditioning, ScoreAug mode intensity, compat options ---
    @model_validator(mode="after")
    def _reproduction_options_fit(self):
        t, c, mode = self.train, self.compat, self.data.mode
        if t.self_conditioning == "x0" and self.diffrs.enabled:
            raise ValueError("train.self_conditioning does not combine with diffrs (the DiffRS head reads the "
                             "network without the x0 estimate channels)")
        sa = t.scoreaug
        if sa is not None and sa.mode_intensity:
            if mode != "multi":
                raise ValueError(f"train.scoreaug.mode_intensity scales by the modality: it needs data.mode = "
                                 f"'multi', not {mode!r}")
            if not sa.omega:
                raise ValueError("train.scoreaug.mode_intensity needs omega = true (omega dims 32-35 carry the "
                                 "modality)")
            if sa.brightness:
                raise ValueError("train.scoreaug.mode_intensity and brightness share omega dims 32-35; choose one")
        if c.reference_bin_spacing and mode not in ("seg_conditioned", "seg_conditioned_input"):
            raise ValueError("compat.reference_bin_spacing changes size bins: it needs a size-bin mode "
                             f"(seg_conditioned or seg_conditioned_input), not {mode!r}")
        if c.first_mode_batches and mode != "multi":
            raise ValueError(f"compat.first_mode_batches applies to data.mode = 'multi', not {mode!r}")
        if c.val_perceptual and self.data.dims != 2:
            raise ValueError("compat.val_perceptual reproduces 2D runs (every 3D run post-dates it); use dims = 2")
        return self

    # Channel layout of each mode: (image channels, condition channels). Vector conditions (size bins,
    # modality one-hot) travel as constant condition maps after the mask channel; see vector_channels.
    def channels(self) -> tuple[int, int]:
        return {"bravo": (1, 1), "seg": (1, 0), "dual": (2, 1), "multi": (1, 5), "seg_conditioned": (1, 7),
                "seg_conditioned_input": (1, 7)}[self.data.mode]

    def vector_channels(self) -> int:
        """Trailing condition channels the network reads as a vector (not as input maps)."""
        return {"multi": 4, "seg_conditioned": 7}.get(self.data.mode, 0)

    def modalities(self) -> tuple[str, ...]:
        """Files a patient needs for this mode."""
        return {"bravo": ("bravo", "seg"), "dual": ("t1_pre", "t1_gd", "seg"),
                "multi": ("bravo", "flair", "t1_pre", "t1_gd", "seg")}.get(self.data.mode, ("seg",))
