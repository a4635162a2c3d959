"""Metrics of the StyleGAN paper: FID, perceptual path length (4 variants), linear separability.

Usage (training or a command)::

    from stylegan_dist import metrics
    opts = metrics.MetricOptions(G=G_ema, resolution=64, data="data/shapes64", num=10_000)
    result = metrics.calc_metric("fid50k", opts)   # {'name', 'results': {'fid50k': ...}, 'seconds', 'num'}

See docs/metrics.md for the definitions, weight files and timings.
"""

from . import fid, ppl, separability  # noqa: F401  (registers the metrics)
from .registry import (
    MetricError,
    MetricOptions,
    calc_metric,
    get_metric,
    is_valid_metric,
    list_metrics,
    parse_metric_list,
    register_metric,
    single_process_gather,
    torch_distributed_gather,
)
from .training import MetricsSettings, metrics_due, run_training_metrics, settings_from_config, with_metrics

__all__ = [
    "MetricError",
    "MetricOptions",
    "MetricsSettings",
    "calc_metric",
    "get_metric",
    "is_valid_metric",
    "list_metrics",
    "metrics_due",
    "parse_metric_list",
    "register_metric",
    "run_training_metrics",
    "settings_from_config",
    "single_process_gather",
    "torch_distributed_gather",
    "with_metrics",
]
