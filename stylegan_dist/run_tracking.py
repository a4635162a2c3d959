"""What one training process logs to its MLflow run, the same for Ray workers and ``--no-ray``.

* rank 0: every tick's statistics (grouped keys, see ``tracking.metric_key``) and the sample grid as a
  time-stepped image (key ``samples``), both at step = images seen; G_ema as a registered MLflow model at the end
  of training and at every new best of the first FID metric (``mlflow_model``);
* local rank 0 of every node: the node's system metrics (``sysmetrics``), at the same steps.

Logging the model never stops training: a failure is printed and recorded in the run's tag ``model.error``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .config import Config
from .metrics.registry import parse_metric_list
from .tracking import RunLogger, metric_key

MODEL_URI_TAG = "model.uri"  # the newest registered version, models:/NAME/VERSION
MODEL_BEST_TAG = "model.best_uri"


def model_name_for(cfg: Config, default: str) -> str:
    return cfg.tracking.model_name or default


def first_fid(cfg: Config) -> str | None:
    names = parse_metric_list(cfg.metrics.names) if cfg.metrics.names.strip() else []
    return next((n for n in names if n.startswith("fid")), None)


class RunTracker:
    def __init__(self, uri: str, run_id: str, cfg: Config, model_name: str, *, rank: int = 0,
                 node_leader: bool | None = None, node: str = "node_0",
                 log: Callable[[str], None] | None = print):
        self.uri, self.run_id, self.cfg, self.model_name = uri, run_id, cfg, model_name
        self.is_main = rank == 0
        self.say = log if (self.is_main and log is not None) else (lambda _m: None)
        self.logger = RunLogger(uri, run_id) if (self.is_main or node_leader) else None
        self.system = None
        if (self.is_main if node_leader is None else node_leader) and cfg.tracking.system_metrics_sec > 0:
            from .sysmetrics import NodeSystemMetrics

            self.system = NodeSystemMetrics(uri, run_id, node, cfg.tracking.system_metrics_sec)
        self.fid = first_fid(cfg)
        self.registered: str | None = None

    # ---- every tick, every rank -------------------------------------------------------------------------
    def tick(self, stats: dict[str, Any]) -> None:
        step = int(stats["cur_nimg"])
        if self.system is not None:
            self.system.flush(step)
        if not self.is_main:
            return
        self.logger.log_metrics(stats, step=step)
        if stats.get("grid"):
            self.logger.log_image(stats["grid"], key="samples", step=step)

    # ---- rank 0, after the tick's metrics: the generator as an MLflow model ---------------------------------
    def generator(self, G_ema: Any, stats: dict[str, Any], done: bool) -> None:
        if not self.is_main or not self.cfg.tracking.log_model:
            return
        value = stats.get(self.fid) if self.fid else None
        best = value is not None and math.isfinite(value) and self._beats_best(float(value))
        if not (best or done):
            return
        tags = {"mlflow_run_id": self.run_id}
        if value is not None:
            tags[metric_key(self.fid)] = f"{value:.6g}"
        try:
            from .mlflow_model import BEST_ALIAS, log_generator

            uri, _ = log_generator(self.uri, self.run_id, G_ema, self.cfg, int(stats["cur_nimg"]), self.model_name,
                                   alias=BEST_ALIAS if best else None, tags=tags)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.say(f"warning: G_ema was not logged as an MLflow model ({msg}); training goes on.")
            self.logger.set_tag("model.error", msg)
            return
        self.registered = uri
        self.logger.set_tag(MODEL_URI_TAG, uri)
        if best:
            self.logger.set_tag(MODEL_BEST_TAG, uri)
        self.say(f"G_ema registered as {uri}" + (f" ({self.fid} {value:.4g}, alias best)" if best else "") + ".")

    def _beats_best(self, value: float) -> bool:
        """Lower than the value of the version the alias ``best`` points at (of any run under this name)."""
        from mlflow.tracking import MlflowClient

        from .mlflow_model import BEST_ALIAS

        try:
            current = MlflowClient(self.uri).get_model_version_by_alias(self.model_name, BEST_ALIAS)
        except Exception:  # no such model or alias yet
            return True
        held = current.tags.get(metric_key(self.fid))
        try:
            return held is None or value < float(held)
        except ValueError:
            return True

    def close(self) -> None:
        if self.system is not None:
            self.system.close()
