"""Metrics during training: settings from the config's ``metrics`` section and one call per evaluation.

The loop calls ``metrics_due`` at each tick end and, when due, ``run_training_metrics`` on every rank with
G_ema; all ranks get the same values back (rank 0 logs them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..config import MetricsConfig
from .registry import MetricOptions, calc_metric, extractors_needed, parse_metric_list, single_process_gather

# The config's ``metrics`` section is the one definition of these settings.
MetricsSettings = MetricsConfig


class _WithMetrics:
    def __init__(self, cfg: Any, settings: MetricsSettings):
        self._cfg, self.metrics = cfg, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


def with_metrics(cfg: Any, **settings: Any) -> Any:
    """``cfg`` seen with a ``metrics`` section holding ``settings`` (for tests, and for callers whose Config
    has no such section)."""
    return _WithMetrics(cfg, MetricsSettings(**settings))


def settings_from_config(cfg: Any) -> MetricsSettings:
    section = getattr(cfg, "metrics", None)
    if section is None:
        return MetricsSettings()
    known = {f.name for f in dataclasses.fields(MetricsSettings)}
    values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    return MetricsSettings(**{k: v for k, v in values.items() if k in known})


def metrics_due(cfg: Any, cur_nimg: int, last_metrics_nimg: int, done: bool) -> bool:
    s = settings_from_config(cfg)
    if not s.names.strip() or s.kimg <= 0:
        return False
    return done or cur_nimg - last_metrics_nimg >= s.kimg * 1000


_EXTRACTORS: dict[tuple, Any] = {}  # loaded once per process: (kind, paths, device) -> module


def _cached(kind: str, paths: tuple, device: torch.device, build: Callable[[], Any]) -> Any:
    key = (kind, paths, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = build()
    return _EXTRACTORS[key]


def options_from_settings(s: MetricsSettings, G: torch.nn.Module, *, resolution: int, alpha: float,
                          data: str | None, device: torch.device, rank: int = 0, world_size: int = 1,
                          gather: Callable[[Any], list[Any]] | None = None,
                          progress: Callable[[str], None] | None = None, mirror: bool = False) -> MetricOptions:
    """``mirror``: whether the run used mirror augmentation (FID mirrors its reals then, unless
    ``s.fid_mirror`` says otherwise)."""
    return MetricOptions(
        G=G, resolution=resolution, alpha=alpha, data=s.data or data, num=s.num or None,
        batch_size=s.batch_size, device=device, seed=s.seed, rank=rank, world_size=world_size,
        gather=gather or single_process_gather, cache_dir=s.cache_dir or None,
        weights={"inception": s.inception_weights or None, "vgg16": s.vgg16_weights or None,
                 "lpips": s.lpips_weights or None, "classifier": s.classifier or None},
        ppl_crop=s.ppl_crop, ls_min_accuracy=s.ls_min_accuracy, progress=progress,
        fid_mirror=mirror if s.fid_mirror is None else s.fid_mirror, fid_repeat_reals=s.fid_repeat_reals,
    )


def run_mirrored(cfg: Any) -> bool:
    train = getattr(cfg, "train", None)
    return bool(getattr(train, "mirror", False))


def protocol_params(cfg: Any, world_size: int = 1) -> dict[str, str]:
    """The protocol of each metric the config evaluates during training, as MLflow params (see
    registry.protocol): crop, mirror, number of reals, precision."""
    from .registry import protocol

    s = settings_from_config(cfg)
    out: dict[str, str] = {}
    for name in parse_metric_list(s.names):
        probe = options_from_settings(s, _NoG(), resolution=4, alpha=1.0, data=None, device=torch.device("cpu"),
                                      mirror=run_mirrored(cfg))
        out.update(protocol(name, probe))
    return out


class _NoG(torch.nn.Module):
    """Stands in for G where only the options' settings are read."""

    max_resolution = 4


def run_training_metrics(cfg: Any, G_ema: torch.nn.Module, data: str | None, cur_nimg: int, *, rank: int = 0,
                         world_size: int = 1, device: torch.device | str = "cpu",
                         gather: Callable[[Any], list[Any]] | None = None,
                         log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Run the configured metrics on G_ema at the schedule's current resolution -> {'fid50k': ..., ...}.

    Feature extractors are loaded once per process and reused at later evaluations.
    """
    from ..schedule import phase_at
    from .fid import get_inception
    from .ppl import get_lpips
    from .separability import get_classifier

    s = settings_from_config(cfg)
    names = parse_metric_list(s.names)
    phase = phase_at(cfg, cur_nimg)
    device = torch.device(device)
    opts = options_from_settings(s, G_ema, resolution=phase.resolution, alpha=phase.alpha, data=data,
                                 device=device, rank=rank, world_size=world_size, gather=gather, progress=log,
                                 mirror=run_mirrored(cfg))
    w = opts.weights
    need = extractors_needed(names)
    if "inception" in need:
        opts.inception = _cached("inception", (w["inception"],), device, lambda: get_inception(opts))
    if "lpips" in need:
        opts.lpips = _cached("lpips", (w["vgg16"], w["lpips"]), device, lambda: get_lpips(opts))
    if "classifier" in need:
        opts.classifier = _cached("classifier", (w["classifier"],), device, lambda: get_classifier(opts))
    out: dict[str, float] = {}
    for name in names:
        r = calc_metric(name, opts)
        out.update(r["results"])
        if log is not None and rank == 0:
            vals = ", ".join(f"{k} {v:.4g}" for k, v in r["results"].items())
            log(f"metric {name} at kimg {cur_nimg / 1000:.1f} (res {phase.resolution}): {vals} ({r['seconds']:.1f} s)")
    return out
