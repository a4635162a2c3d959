"""Run configuration: frozen dataclasses whose defaults are the paper's FFHQ 1024x1024 setup (config F).

Precedence: dataclass defaults < YAML file < ``--set section.key=value``. Every key is addressed as
``section.key`` (for example ``generator.mapping_layers``). Unknown keys and wrong types raise
``ConfigError`` with one sentence that names the key and, where there is one, the closest valid key.

Generator switches that depend on the architecture default to ``None`` and are filled in by
``resolve()``: the style-based generator gets mapping + styles + constant input + noise + instance
norm, the traditional (Progressive GAN) generator gets latent input + pixel norm and nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one sentence."""


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = 1024  # final output resolution, a power of two >= 8
    num_channels: int = 3
    fmap_base: int = 8192  # channels at resolution R: min(fmap_base / 2^(log2(R) - 1), fmap_max)
    fmap_max: int = 512
    latent_dim: int = 512  # z
    w_dim: int = 512  # w (the mapping network's output)
    # Fused 3x3 conv + up/down sampling as a single strided (transposed) 4x4 conv. The official code
    # fuses from 128x128 on ("auto"); "always"/"never" give the same function at other speeds.
    fused_scale: str = "auto"
    blur: bool = True  # [1,2,1] low-pass after upsampling / before downsampling (Table 1 B "bilinear")


@dataclass(frozen=True)
class GeneratorConfig:
    architecture: str = "style"  # "style" (paper) or "traditional" (Progressive GAN generator)
    mapping_layers: int | None = None  # style: 8, traditional: 0 (Table 4 sweeps 0/1/2/8 for both)
    mapping_fmaps: int = 512
    mapping_lrmul: float = 0.01
    normalize_latents: bool = True  # pixel norm on z
    use_styles: bool | None = None  # AdaIN styles from w at every layer (style: on)
    const_input: bool | None = None  # learned 4x4 constant instead of the latent as input (style: on)
    use_noise: bool | None = None  # per-layer noise inputs (style: on)
    use_instance_norm: bool | None = None  # style: on
    use_pixel_norm: bool | None = None  # traditional: on (Progressive GAN)
    mixing_prob: float | None = None  # style mixing regularisation (style: 0.9; needs styles)
    w_avg_beta: float = 0.995  # running average of w for truncation
    # For visualisation only, never for metrics. style: 0.7; traditional: 1 (off), as the official code, whose
    # traditional configurations set truncation_psi=None: its single w would otherwise be truncated at every layer.
    truncation_psi: float | None = None
    truncation_cutoff: int = 8  # layers [0, cutoff) are truncated


@dataclass(frozen=True)
class DiscriminatorConfig:
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1


@dataclass(frozen=True)
class LossConfig:
    kind: str = "logistic_r1"  # "logistic_r1" (FFHQ) or "wgan_gp" (CelebA-HQ in the paper)
    r1_gamma: float = 10.0
    # R1 every step in the paper. N > 1 is StyleGAN2's lazy regularisation (gamma scaled by N).
    r1_interval: int = 1
    wgan_lambda: float = 10.0
    wgan_epsilon: float = 0.001
    wgan_target: float = 1.0
    # Official CelebA-HQ WGAN-GP configuration: every learning rate capped at 0.002 (0: no cap).
    wgan_lr_cap: float = 0.002
    # Where R1 / the WGAN-GP gradient is measured while growing. "final" (official): with respect to the reals
    # nearest-upscaled to model.resolution, as the official D sees them, so at training resolution r the effective
    # gamma is r1_gamma * (r / R)^2 and WGAN-GP's target is met by |grad| = wgan_target * R / r at resolution r.
    # "training": at the training resolution (the PyTorch ports), gamma and target as given at every resolution.
    penalty_resolution: str = "final"


def _default_batch() -> dict[int, int]:
    return {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8, 512: 4, 1024: 4}


def _default_lr() -> dict[int, float]:
    return {128: 0.0015, 256: 0.002, 512: 0.003, 1024: 0.003}


def _default_tick() -> dict[int, float]:
    return {4: 160, 8: 140, 16: 120, 32: 100, 64: 80, 128: 60, 256: 40, 512: 30, 1024: 20}


@dataclass(frozen=True)
class ScheduleConfig:
    start_resolution: int = 8
    stabilise_kimg: float = 600.0
    fade_kimg: float = 600.0
    total_kimg: float = 25000.0
    batch_per_gpu: dict[int, int] = field(default_factory=_default_batch)
    batch_base: int = 4  # per GPU, for resolutions missing from batch_per_gpu
    lr_base: float = 0.001
    lr_dict: dict[int, float] = field(default_factory=_default_lr)
    tick_kimg_base: float = 160.0
    tick_kimg_dict: dict[int, float] = field(default_factory=_default_tick)
    minibatch_repeats: int = 4  # the schedule is re-evaluated every this many steps (official: 4)
    # D's learning rate is this times the schedule's (G's). The official loop has separate G and D rates, equal in
    # every released configuration (1 here); a faster D is the two-time-scale rule (Heusel et al., 2017).
    d_lr_mult: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    reset_on_lod_change: bool = True  # Adam state reset when a fade starts or ends (official)
    ema_halflife_kimg: float = 10.0  # G_ema half-life
    # An optimiser step whose gradients are not all finite is skipped (official optimizer); the run stops after
    # this many consecutive skipped training steps, keeping the last good checkpoint.
    max_skipped_steps: int = 100


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    mirror: bool = True  # mirror augmentation (done by the data source)
    image_snapshot_ticks: int = 1  # sample grid every N ticks (0: never)
    checkpoint_kimg: float = 200.0  # checkpoint at the first tick end after this many kimg (and at the end)
    keep_checkpoints: int = 3  # newest K kept
    grid_size: int = 32  # samples in the grid
    grid_seed: int = 123


@dataclass(frozen=True)
class MetricsConfig:
    """Metrics evaluated on G_ema during training (stylegan_dist.metrics; docs/metrics.md)."""

    names: str = ""  # comma-separated, e.g. "fid50k,ppl_wend,ls"; empty: none during training
    kimg: float = 0.0  # evaluate every this many kimg (at the first tick end after) and at the end; 0: never
    num: int = 0  # samples per metric (0: the paper's counts, 50k FID / 100k PPL / 200k LS)
    batch_size: int = 32
    seed: int = 0
    data: str = ""  # real images for FID (empty: the training dataset)
    cache_dir: str = ""  # FID real-statistics cache (empty: $STYLEGAN_CACHE_DIR or ~/.cache/stylegan_dist)
    inception_weights: str = ""  # empty: $STYLEGAN_INCEPTION_WEIGHTS or the default location
    vgg16_weights: str = ""
    lpips_weights: str = ""
    classifier: str = ""
    ppl_crop: bool = True  # central face crop before LPIPS (StyleGAN v1's PPL always crops; off for non-faces)
    # FID reals as the official metric: mirrored at random when the run used mirror augmentation (None: follow
    # train.mirror), and the dataset repeated until there are as many reals as generated images.
    fid_mirror: bool | None = None
    fid_repeat_reals: bool = True  # false: the first min(num, dataset size) reals, each once
    ls_min_accuracy: float = 0.8  # ls skips attributes the classifier reads worse than this (balanced accuracy)


@dataclass(frozen=True)
class PerfConfig:
    precision: str = "fp32"  # "fp32", "tf32" (TF32 matmul/conv on Ampere+) or "bf16" (autocast, fp32 master)
    channels_last: bool = False
    compile: bool = False  # torch.compile G and D


@dataclass(frozen=True)
class TrackingConfig:
    # G_ema as an MLflow model (mlflow.pytorch, z -> image) in the Model Registry: at the end of training and at
    # every new best of the first FID metric in metrics.names (alias "best"). Name "": the run's name (the sweep's
    # name for a sweep's trials, one version per trial).
    log_model: bool = True
    model_name: str = ""
    # MLflow system metrics (CPU, memory, disk, network, NVIDIA GPUs) sampled on local rank 0 of every node
    # every this many seconds, logged at each tick end at step = images seen as system/node_<k>/...; 0: off.
    system_metrics_sec: float = 10.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # section name -> dataclass

# Architecture-dependent generator defaults, filled in by resolve().
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "style": dict(
        mapping_layers=8, use_styles=True, const_input=True, use_noise=True,
        use_instance_norm=True, use_pixel_norm=False, mixing_prob=0.9, truncation_psi=0.7,
    ),
    "traditional": dict(
        mapping_layers=0, use_styles=False, const_input=False, use_noise=False,
        use_instance_norm=False, use_pixel_norm=True, mixing_prob=0.0, truncation_psi=1.0,
    ),
}

# Paper Table 1 configurations A-F as overrides (FFHQ). A and B differ in the paper also by training
# length and hyper-parameters the table does not list; here they differ by the network only.
TABLE1_PRESETS: dict[str, dict[str, Any]] = {
    "A": {"generator.architecture": "traditional", "model.blur": False},
    "B": {"generator.architecture": "traditional"},
    "C": {"generator.const_input": False, "generator.use_noise": False, "generator.mixing_prob": 0.0},
    "D": {"generator.use_noise": False, "generator.mixing_prob": 0.0},
    "E": {"generator.mixing_prob": 0.0},
    "F": {},
}


# --------------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in SECTIONS.items() for k in _section_types(cls)]


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; convert YAML-ish inputs where unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is dict:
        kt, vt = args
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' expects a mapping like {{8: 128}}, got {value!r}.")
        return {_coerce(f"{key}[{k!r}]", k, kt): _coerce(f"{key}[{k!r}]", v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key '{key}' expects true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ConfigError(f"Config key '{key}' expects an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"Config key '{key}' expects a number, got {value!r}.") from None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"Config key '{key}' expects a string, got {value!r}.")
        return value
    raise ConfigError(f"Config key '{key}' has an unsupported type {_type_name(tp)}.")


def _flatten(d: dict, where: str) -> dict[str, Any]:
    """{'generator': {'mapping_layers': 2}} or {'generator.mapping_layers': 2} -> flat dotted keys."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        k = str(k)
        if k in SECTIONS and isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        elif k in SECTIONS:
            raise ConfigError(f"Config section '{k}' in {where} must be a mapping of keys, got {v!r}.")
        else:
            flat[k] = v
    return flat


def apply_overrides(cfg: Config, overrides: dict[str, Any], where: str = "overrides") -> Config:
    """Return a new Config with dotted-key overrides applied and type-checked."""
    keys = all_keys()
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    for key, value in _flatten(overrides, where).items():
        if key not in keys:
            raise ConfigError(f"Unknown config key '{key}' in {where}{_closest(key, keys)}.")
        section, name = key.split(".", 1)
        tp = _section_types(type(sections[section]))[name]
        sections[section] = dataclasses.replace(sections[section], **{name: _coerce(key, value, tp)})
    return Config(**sections)


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """``["generator.mapping_layers=2", "schedule.lr_dict={128: 0.002}"]`` -> dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: could not parse the value '{raw}'.") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"Config file {path} is not valid YAML{at}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections, not {type(data).__name__}.")
    preset = data.pop("preset", None)
    flat = dict(TABLE1_PRESETS[_preset_name(preset, path)]) if preset is not None else {}
    flat.update(_flatten(data, str(path)))
    return flat


def _preset_name(preset: Any, where: Any) -> str:
    if str(preset) not in TABLE1_PRESETS:
        raise ConfigError(f"Unknown preset {preset!r} in {where}; choose one of {', '.join(TABLE1_PRESETS)}.")
    return str(preset)


def build_config(config_file: str | Path | None = None, set_args: list[str] | None = None,
                 preset: str | None = None) -> Config:
    """Defaults < preset < YAML file < --set, then resolved and validated."""
    cfg = Config()
    if preset is not None:
        cfg = apply_overrides(cfg, TABLE1_PRESETS[_preset_name(preset, "--preset")], f"preset {preset}")
    if config_file is not None:
        cfg = apply_overrides(cfg, load_yaml(config_file), str(config_file))
    cfg = apply_overrides(cfg, parse_set_args(set_args), "--set")
    return resolve(cfg)


def resolve(cfg: Config) -> Config:
    """Fill architecture-dependent defaults and check that the whole config makes sense."""
    g = cfg.generator
    if g.architecture not in ARCHITECTURES:
        raise ConfigError(f"generator.architecture must be one of {', '.join(ARCHITECTURES)}, got '{g.architecture}'.")
    fills = {k: v for k, v in ARCHITECTURES[g.architecture].items() if getattr(g, k) is None}
    g = dataclasses.replace(g, **fills)
    cfg = dataclasses.replace(cfg, generator=g)
    validate(cfg)
    return cfg


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def validate(cfg: Config) -> None:
    m, g, d, s, lo, p = cfg.model, cfg.generator, cfg.discriminator, cfg.schedule, cfg.loss, cfg.perf
    checks = [
        (_is_pow2(m.resolution) and m.resolution >= 8,
         f"model.resolution must be a power of two >= 8, got {m.resolution}"),
        (m.fused_scale in ("auto", "always", "never"),
         f"model.fused_scale must be auto, always or never, got '{m.fused_scale}'"),
        (m.fmap_base >= 1 and m.fmap_max >= 1, "model.fmap_base and model.fmap_max must be positive"),
        (m.latent_dim >= 1 and m.w_dim >= 1, "model.latent_dim and model.w_dim must be positive"),
        (g.mapping_layers >= 0, f"generator.mapping_layers must be >= 0, got {g.mapping_layers}"),
        (g.mapping_layers > 0 or m.latent_dim == m.w_dim,
         "generator.mapping_layers = 0 means W = Z, so model.latent_dim must equal model.w_dim"),
        (0.0 <= g.mixing_prob <= 1.0, f"generator.mixing_prob must be in [0, 1], got {g.mixing_prob}"),
        (g.mixing_prob == 0.0 or g.use_styles,
         "generator.mixing_prob > 0 needs generator.use_styles (one w per layer)"),
        (g.use_styles or not g.const_input, "generator.const_input without styles would ignore the latent entirely"),
        (0.0 <= g.w_avg_beta <= 1.0, f"generator.w_avg_beta must be in [0, 1], got {g.w_avg_beta}"),
        (d.mbstd_group_size >= 0, "discriminator.mbstd_group_size must be >= 0"),
        (lo.kind in ("logistic_r1", "wgan_gp"), f"loss.kind must be logistic_r1 or wgan_gp, got '{lo.kind}'"),
        (lo.r1_interval >= 1, f"loss.r1_interval must be >= 1, got {lo.r1_interval}"),
        (lo.penalty_resolution in ("final", "training"),
         f"loss.penalty_resolution must be final or training, got '{lo.penalty_resolution}'"),
        (lo.wgan_lr_cap >= 0, f"loss.wgan_lr_cap must be >= 0, got {lo.wgan_lr_cap}"),
        (cfg.optim.max_skipped_steps >= 1, f"optim.max_skipped_steps must be >= 1, got {cfg.optim.max_skipped_steps}"),
        (_is_pow2(s.start_resolution) and 4 <= s.start_resolution <= m.resolution,
         f"schedule.start_resolution must be a power of two in [4, model.resolution], got {s.start_resolution}"),
        (s.stabilise_kimg >= 0 and s.fade_kimg >= 0 and s.total_kimg > 0,
         "schedule kimg values must be >= 0 (total > 0)"),
        (s.minibatch_repeats >= 1, "schedule.minibatch_repeats must be >= 1"),
        (all(v >= 1 for v in s.batch_per_gpu.values()) and s.batch_base >= 1, "schedule batch sizes must be >= 1"),
        (all(v > 0 for v in s.lr_dict.values()) and s.lr_base > 0, "schedule learning rates must be > 0"),
        (s.d_lr_mult > 0, f"schedule.d_lr_mult must be > 0, got {s.d_lr_mult}"),
        (all(v > 0 for v in s.tick_kimg_dict.values()) and s.tick_kimg_base > 0, "schedule tick lengths must be > 0"),
        (p.precision in ("fp32", "tf32", "bf16"), f"perf.precision must be fp32, tf32 or bf16, got '{p.precision}'"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.grid_size >= 1, "train.grid_size must be >= 1"),
        (cfg.tracking.system_metrics_sec >= 0, "tracking.system_metrics_sec must be >= 0 (0: off)"),
        (re.fullmatch(r"[A-Za-z0-9_.\-]*", cfg.tracking.model_name) is not None,
         f"tracking.model_name may contain letters, digits, '_', '.' and '-' only, got '{cfg.tracking.model_name}'"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg + ".")
    if cfg.metrics.names.strip():
        from .metrics.registry import MetricError, parse_metric_list  # the registry imports torch: only when used

        try:
            parse_metric_list(cfg.metrics.names)
        except MetricError as e:
            raise ConfigError(f"metrics.names: {e}") from None


# --------------------------------------------------------------------------------------------------
# Serialisation


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Inverse of to_dict (used for checkpoints); validates like a YAML file would."""
    return resolve(apply_overrides(Config(), d, "checkpoint config"))


def flat_params(cfg: Config) -> dict[str, str]:
    """Dotted key -> printable value, for MLflow params and tables."""
    return {f"{s}.{k}": str(v) for s, sec in to_dict(cfg).items() for k, v in sec.items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def log2i(x: int) -> int:
    r = int(round(math.log2(x)))
    assert 2**r == x, x
    return r
