"""Training configuration: one validated pydantic model, read from YAML/TOML with `--set` overrides."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import PRESETS, ModelConfig
from training.degrade import EVAL_DEGRADATIONS
from training.objectives import PixelLoss
from training.realworld import RealDegradation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    """A preset from `model.config.PRESETS`, with any of `ModelConfig`'s fields overridden."""

    preset: str = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose from {sorted(PRESETS)}")
        self.build()  # raises ValueError on bad overrides
        return self

    def build(self) -> ModelConfig:
        base = PRESETS[self.preset].to_dict()
        base.update(self.overrides)
        return ModelConfig.from_dict(base)


class DegradationSection(_Strict):
    """How training LR patches are made from HR ones: `bicubic` (MATLAB bicubic x1/scale, cached once per image;
    the paper's setting) or `real` (`training.realworld`: blur, resize, noise and JPEG, twice, drawn afresh for
    every patch in the data loader's workers)."""

    kind: Literal["bicubic", "real"] = "bicubic"
    real: RealDegradation = Field(default_factory=RealDegradation)


class TeacherSection(_Strict):
    """Distillation (`training.teacher`): the training target is `weight` times a teacher model's upscale of the
    patch's clean bicubic LR plus the rest of the HR patch. The teacher (a checkpoint directory) upscales each
    training image once, at `steps` (default: its own default steps), `ensemble` flips averaged, in `tile`-px LR
    tiles (0: whole), at `precision`; the result is cached."""

    checkpoint: Path
    weight: float = Field(0.8, gt=0, le=1)
    steps: int | None = Field(None, ge=0)
    ensemble: Literal[1, 2, 4] = 4
    tile: int = Field(256, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"


class DataSection(_Strict):
    train_dir: Path = Path("../shared/data/corpus-hr/train")
    val_dir: Path | None = Path("../shared/data/corpus-hr/val")
    # Directory of SPE maps (<stem>.npy, one per training image), from `samdiffsr masks embed`.
    spe_dir: Path | None = None
    # What to do when an image has no SPE map: skip the image, or train it with an all-zero map.
    missing_spe: Literal["skip", "zeros"] = "skip"
    cache_dir: Path = Path("runs/cache")
    hr_patch: int = Field(160, ge=8)
    batch_size: int = Field(16, ge=1)
    # Samples per image per epoch (an epoch is len(images) * repeat random patches).
    repeat: int = Field(100, ge=1)
    workers: int = Field(2, ge=0)
    augment: bool = True
    degradation: DegradationSection = Field(default_factory=DegradationSection)
    teacher: TeacherSection | None = None


class OptimSection(_Strict):
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    # Step decay as in the original: lr * gamma ** (step // decay_every), counted from decay_start
    # (0 as in the original; later to anneal a run that was trained at a constant rate so far).
    decay_every: int = Field(200_000, ge=1)
    decay_start: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)  # a floor for the decay: a long campaign keeps learning at this rate
    gamma: float = Field(0.5, gt=0, le=1)
    clip_grad: float = Field(10.0, ge=0)  # 0 disables clipping
    # Stage 1's loss on the encoder's image: l1 (the original's), or l2, the squared error that PSNR measures (the
    # field's small networks end their training with it).
    pixel_loss: PixelLoss = "l1"
    ema: float = Field(0.0, ge=0, lt=1)  # EMA decay of the trained weights; 0 disables
    # Parameters held fixed, by their name in the network (a module's name holds all of its): e.g. stage 1
    # training a pruned member of a pretrained pair with the other kept as it is, `[rrdb.nets.rfdn]`.
    frozen: tuple[str, ...] = ()
    # bfloat16 autocast: on CUDA, and on CPUs that compute bf16 natively (AVX-512 BF16 / AMX);
    # ignored on other CPUs, where it is slower than float32.
    amp: bool = True
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU and with AMP on CUDA


class ValSection(_Strict):
    every: int = Field(500, ge=0)  # 0 disables periodic validation
    crop: int = Field(192, ge=16)  # centre crop of each validation image (HR pixels); keeps it cheap
    max_images: int = Field(8, ge=1)
    steps: int = Field(4, ge=1)  # DDIM steps (eta=0) for stage-2 validation
    # The named evaluation degradation (training.degrade.EVAL_DEGRADATIONS) of the validation crops' LR.
    degradation: str = "bicubic"

    @model_validator(mode="after")
    def _check_degradation(self) -> ValSection:
        if self.degradation not in EVAL_DEGRADATIONS:
            raise ValueError(f"val.degradation {self.degradation!r} is not one of {', '.join(EVAL_DEGRADATIONS)}")
        return self


class RunSection(_Strict):
    steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    # Also checkpoint every this many minutes of wall-clock time (0: by steps only): on a GPU, where steps are
    # fast and a window of machine time is short, a stop loses at most this much.
    checkpoint_minutes: float = Field(0.0, ge=0)
    # Split the exact training state into files of at most this many MiB (0: one file), for transfers with a
    # per-file limit (a GPU window's output folder; docs/training.md).
    state_shard_mb: float = Field(0.0, ge=0)
    # The served checkpoint's weight storage (the exact state stays fp32): fp16 halves it and changed PSNR-Y by
    # less than 0.01 dB on the validation photos (docs/model-card.md).
    checkpoint_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: str = "auto"
    # Wall-clock budget: checkpoint and stop after this many minutes (0 = no limit).
    max_minutes: float = Field(0.0, ge=0)
    threads: int = Field(0, ge=0)  # torch.set_num_threads on CPU; 0 keeps torch's default
    # A fresh run starts from this checkpoint's weights (the same network shape; in stage 2 the encoder still
    # comes from diffusion.rrdb_checkpoint), with a new optimiser: to go on from a run whose state is gone, or
    # to adapt a trained denoiser to a retrained encoder. A resumed run ignores it.
    init: Path | None = None


class DiffusionSection(_Strict):
    # Stage 1 checkpoint (our format) whose RRDB is loaded and frozen.
    rrdb_checkpoint: Path | None = None
    # For an encoder of pretrained networks (`model.encoder: rfdn`, `rfdn+rlfn`, ...) without a stage-1 checkpoint:
    # the folder with one sub-folder per network holding its published weights (`../shared/pretrained`).
    pretrained_dir: Path | None = None
    # For a fusion of pretrained networks (`rfdn+rlfn`): fit their mixing weights by least squares on this many
    # training patches before training (`training.fusion`); 0 starts from their plain mean.
    fit_mix_patches: int = Field(default=0, ge=0)
    # False trains plain SRDiff (no structure modulation), for ablations.
    structure: bool = True
    # The encoder's learning rate in stage 2, as a fraction of optim.lr. 0 keeps it frozen, as SRDiff does;
    # above 0 it is tuned jointly with the denoiser (with `prediction: sample` the loss is then the L1 of
    # the output image itself, through the encoder too).
    encoder_lr: float = Field(default=0.0, ge=0.0)
    # With a tuned encoder: the weight of stage 1's L1 (its x4 output against HR) added to the loss, so that
    # the encoder's own output (steps=0, the fidelity mode) stays an image and not only a base for the residual.
    encoder_l1: float = Field(default=0.0, ge=0.0)
    # The fraction of training timesteps drawn from the served sampler's plan (t = T-1 alone for one step)
    # instead of uniformly: 0 is the paper's uniform draw.
    plan_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    # The steps of that plan; default: the model's default steps (`extras.default_steps`). Set where the model is
    # trained for one number of steps and served at another (`fast`: trained at 1, served at 0).
    plan_steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_encoder_l1(self) -> DiffusionSection:
        if self.encoder_l1 > 0 and not self.tunes_encoder:
            raise ValueError("diffusion.encoder_l1 trains the encoder: it needs diffusion.encoder_lr > 0 "
                             "(with the encoder frozen it would change nothing)")
        return self

    @property
    def tunes_encoder(self) -> bool:
        return self.encoder_lr > 0


class TrainConfig(_Strict):
    name: str = "samdiffsr"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    val: ValSection = Field(default_factory=ValSection)
    run: RunSection = Field(default_factory=RunSection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)

    @model_validator(mode="after")
    def _check_patch(self) -> TrainConfig:
        cfg = self.model.build()
        mult = max(cfg.scale, cfg.hr_multiple)
        if self.data.hr_patch % mult:
            raise ValueError(f"data.hr_patch={self.data.hr_patch} must be a multiple of {mult} "
                             f"(scale {cfg.scale}, U-Net levels {cfg.levels})")
        if self.val.crop % mult:
            raise ValueError(f"val.crop={self.val.crop} must be a multiple of {mult}")
        return self


class ConfigError(ValueError):
    """An unreadable or invalid training configuration."""


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists (`1e-4`, `true`, `[1, 2]`, `path/x`)."""
    import yaml

    return yaml.safe_load(text)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override to a nested dict in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = _parse_value(value)


def merge_trees(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: sections merge key by key, any other value (lists too) replaces the base's."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tree; with a top-level `base: other.yaml` (relative to this file), this file's values over
    that one's, so a recipe's next stage states only what it changes."""
    p = Path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"{p}: its `base` chain comes back to itself")
    data = _parse_file(p)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: `base` must be the path of another config file, not {base!r}")
    return merge_trees(read_config_file(p.parent / base, (*_seen, p.resolve())), data)


def _parse_file(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:
        raise ConfigError(f"{p}: cannot parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML/TOML/JSON config (or start from defaults), apply overrides, validate."""
    tree = read_config_file(path) if path else {}
    for o in overrides:
        apply_override(tree, o)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid training config:\n{e}") from e
