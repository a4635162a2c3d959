"""Logging metric values and figures into an existing MLflow run (through ``stylegan_dist.tracking``).

The tracking URI is the one given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<absolute ./mlflow.db>``;
relative sqlite/file locations are made absolute. Values go in by run id through ``MlflowClient``, so a
run that is still training keeps its status, and at step = the checkpoint's image count, as training logs.
"""

from __future__ import annotations

import os
from pathlib import Path

from .registry import MetricError


def resolve_tracking_uri(uri: str | None = None) -> str:
    from ..tracking import absolute_uri

    return absolute_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def run_logger(run_id: str, uri: str | None):
    """A ``RunLogger`` for an existing run, or MetricError (one sentence)."""
    try:
        from ..tracking import RunLogger, run_exists
    except ImportError:
        raise MetricError("Logging to MLflow needs the mlflow package; install it or leave out --mlflow-run.") \
            from None
    uri = resolve_tracking_uri(uri)
    if not run_exists(uri, run_id):
        raise MetricError(f"MLflow run {run_id} was not found in the tracking store {uri}; set "
                          f"MLFLOW_TRACKING_URI (or --tracking-uri) to the store the training run used.")
    return RunLogger(uri, run_id)


def check_run(run_id: str, uri: str | None = None) -> None:
    """Raise MetricError (one sentence) unless the run exists in the tracking store."""
    run_logger(run_id, uri)


def log_metrics(run_id: str, values: dict[str, float], step: int = 0, uri: str | None = None) -> None:
    run_logger(run_id, uri).log_metrics(values, step=int(step))


def log_artifacts(run_id: str, paths: list[str | Path], artifact_path: str = "figures", uri: str | None = None
                  ) -> None:
    logger = run_logger(run_id, uri)
    for p in paths:
        logger.log_artifact(p, artifact_path)


def log_protocol(run_id: str, protocol: dict[str, str], uri: str | None = None) -> None:
    """Record how the metrics were measured (``protocol.<metric>.<field>``) in the run's params. MLflow params
    cannot change, so a key the run already holds with another value (a later evaluation with other settings)
    goes to a tag of the same name, which shows the latest."""
    from ..tracking import log_params

    logger = run_logger(run_id, uri)
    have = logger.client.get_run(run_id).data.params
    new = {k: v for k, v in protocol.items() if k not in have}
    if new:
        log_params(resolve_tracking_uri(uri), run_id, new)
    for k, v in protocol.items():
        if k in have and have[k] != v:
            logger.set_tag(k, v)
