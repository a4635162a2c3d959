"""MLflow tracking: one MLflow run per training run, addressed by id from the driver and from rank 0.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<storage>/mlflow.db`` with an
absolute path (a relative URI would resolve against each Ray worker's own working directory).
Everything goes through ``MlflowClient`` with an explicit run id, so no global "active run" state
crosses process boundaries.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "stylegan_dist"


def resolve_tracking_uri(storage: str | Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return absolute_uri(uri)
    base = Path(storage or ".").expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """Make file paths and sqlite paths absolute; leave server URIs (http, databricks, ...) alone."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file:"):] if uri.startswith("file:") else uri
        path = path[2:] if path.startswith("//") else path
        return Path(path).expanduser().resolve().as_uri()
    return uri


def uri_for_checkpoint(checkpoint: str | Path | None) -> str | None:
    """MLFLOW_TRACKING_URI, else the STORAGE/mlflow.db that training wrote for the run holding ``checkpoint``
    (STORAGE/RUN/checkpoint_*/ckpt.pt or STORAGE/RUN/checkpoints/ckpt-*.pt); None when there is neither."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_uri(os.environ["MLFLOW_TRACKING_URI"])
    if checkpoint:
        for parent in list(Path(checkpoint).expanduser().resolve().parents)[:4]:
            if (parent / "mlflow.db").is_file():
                return f"sqlite:///{parent / 'mlflow.db'}"
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_run(uri: str, experiment: str, run_name: str, params: dict[str, str],
               tags: dict[str, str] | None = None) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = _client(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def run_exists(uri: str, run_id: str) -> bool:
    try:
        _client(uri).get_run(run_id)
        return True
    except Exception:
        return False


class RunLogger:
    """Per-tick metrics and artifacts into one MLflow run (used on rank 0)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def terminate(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def run_url_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} (MLFLOW_TRACKING_URI) in a browser, or: mlflow ui --backend-store-uri {uri}"
