"""The preset schema: every key a preset may set, its type, default and meaning. No torch.

Sections follow CONTRACTS.md: [data] [model] [diffusion] [train] [sample] [eval] [chain] [compat].
Units follow the reference: training length, warm-up, validation and checkpoint cadence in epochs.
`kind` strings discriminate alternatives (model family, diffusion strategy).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODES = ("bravo", "seg")
STAGES = ("synth", "train", "sample", "eval", "report")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    root: Optional[str] = None  # dataset root (BrainMetShare layout); `--data DIR` sets it
    dims: Literal[2, 3] = 2  # 2 = axial slices, 3 = volumes
    mode: Literal["bravo", "seg"] = "bravo"  # bravo: image conditioned on its mask; seg: masks alone
    image_size: int = Field(128, ge=8)  # in-plane size after resize (square)
    depth: int = Field(150, ge=1)  # original slice count; outputs are trimmed back to it
    pad_depth_to: int = Field(160, ge=1)  # 3D only: depth after padding (divisible by the UNet)
    pad_mode: Literal["replicate", "constant"] = "replicate"
    normalization: Literal["minmax", "global_percentile"] = "minmax"
    spacing: Optional[tuple[float, float, float]] = None  # (x, y, z) mm override of the header
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: Optional[str] = None  # preprocessed cache; default $MEDGEN_CACHE or ~/.cache/medgen
    num_workers: int = Field(0, ge=0)


class UNetConfig(Strict):
    """MONAI DiffusionModelUNet (SYSTEM.md §4)."""

    kind: Literal["unet"] = "unet"
    channels: list[int] = [128, 256, 256]
    attention_levels: list[bool] = [False, True, True]
    num_res_blocks: Union[int, list[int]] = 1
    num_head_channels: Union[int, list[int]] = 256
    norm_num_groups: int = 32
    gradient_checkpointing: bool = False

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


ModelConfig = Annotated[Union[UNetConfig], Field(discriminator="kind")]


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

    @model_validator(mode="after")
    def _grid_ratio(self):
        if isinstance(self.grid, float) and self.grid <= 0:
            raise ValueError("grid ratio must be > 0")
        return self


class EvalConfig(Strict):
    metrics: list[Literal["psnr", "msssim", "ssim", "lpips"]] = ["psnr", "msssim"]  # one-step x0 metrics
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

    @model_validator(mode="after")
    def _sizes_fit_model(self):
        f = self.model.downsampling
        if self.data.image_size % f:
            raise ValueError(f"data.image_size={self.data.image_size} is not divisible by the model's "
                             f"down-sampling factor {f}")
        if self.data.dims == 3:
            if self.data.pad_depth_to % f:
                raise ValueError(f"data.pad_depth_to={self.data.pad_depth_to} is not divisible by the "
                                 f"model's down-sampling factor {f}")
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

    # Channel layout of each mode: (image channels, condition channels).
    def channels(self) -> tuple[int, int]:
        return {"bravo": (1, 1), "seg": (1, 0)}[self.data.mode]
