"""MLflow tracking: one MLflow run per training run, addressed by id from the driver and from rank 0.

Where runs are tracked:
  * ``MLFLOW_TRACKING_URI`` when set: an ``http(s)://`` tracking server (the way teams run MLflow: every rank
    logs through it and artifacts go through the server's proxied ``mlflow-artifacts:`` store, so no worker needs
    the server's disk; credentials from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), or a database
    URI (``postgresql://``, ``sqlite:////abs/path``), made absolute;
  * else ``sqlite:///<storage>/mlflow.db`` beside a local ``--storage``. Object-store storage has no local disk to
    hold a database, so it needs MLFLOW_TRACKING_URI.
Experiments are created with their artifact location beside their store (``<storage>/mlartifacts`` for a local
store, the storage URI's ``mlartifacts/`` for a database with object-store runs, the server's own store for a
server), never the current directory. Everything goes through ``MlflowClient`` with an explicit run id, so no
global "active run" state crosses process boundaries.

What the UI shows: experiments carry ``mlflow.experimentKind = custom_model_development`` (MLflow 3 lists their runs
as training runs, not GenAI evaluation runs; its side bar's "Model training" mode is a per-browser choice); metric
keys are grouped with "/" (``loss/G``, ``progress/kimg``, ``speed/img_per_sec``, ``metrics/fid50k``,
``system/node_0/...``: one chart section per group) and every metric and image is logged at step = images seen;
sample grids are time-stepped images (``log_image(key, step)``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import storage

DEFAULT_EXPERIMENT = "stylegan_dist"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's model-training view

# Training statistics (loop, sweep, evaluate) -> grouped MLflow metric keys. Keys that hold a "/" already are
# grouped (loss/G, loss/R1, scores/real, skipped_steps/D, system/...); other names are metric values
# (fid50k, ppl_wend, ls_z, ...) and go to metrics/.
_GROUPED = {
    **{k: f"progress/{k}" for k in ("tick", "kimg", "resolution", "alpha", "lod", "batch", "lr")},
    **{k: f"speed/{k}" for k in ("img_per_sec", "sec_per_kimg", "sec_per_tick")},
    "peak_mem_gb": "memory/peak_gb",
    "eval_seconds": "time/eval_seconds",
}
_UNGROUPED = {v: k for k, v in _GROUPED.items()}
_NOT_LOGGED = {"cur_nimg"}  # the step itself
_LEGACY_GROUPS = ("loss", "scores", "skipped_steps")  # runs logged before grouping: loss_G, scores_real, ...

class TrackingError(RuntimeError):
    """A tracking location that cannot be used; the message is one sentence."""


def resolve_tracking_uri(storage_loc: str | Path | None = None, *, create: bool = True) -> str:
    """MLFLOW_TRACKING_URI (absolute), else the sqlite store beside a local storage location."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if storage.under_ray_job() and _is_relative_uri(uri):
            raise TrackingError(f"MLFLOW_TRACKING_URI={uri} is relative inside a Ray job, whose working directory "
                                f"is Ray's temporary copy; use a tracking server (http://HOST:5000) or an absolute "
                                f"path.")
        return absolute_uri(uri)
    loc = storage.resolve(storage_loc or ".")
    if storage.is_uri(loc):
        raise TrackingError(f"Storage {loc} is object storage, which cannot hold MLflow's database; set "
                            f"MLFLOW_TRACKING_URI to a tracking server (http://HOST:5000) or a database URI.")
    if create:
        Path(loc).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(loc) / 'mlflow.db'}"


def _is_relative_uri(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return not uri.startswith("sqlite:////")
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        return not path.startswith("/")
    return "://" not in uri and not os.path.isabs(uri)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(uri: str, storage_loc: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store; under the run storage for a
    database store with object-store runs; the server's own (proxied) store for a tracking server."""
    if is_server(uri):
        return None
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    if storage_loc is not None:
        loc = storage.resolve(storage_loc)
        return storage.join(loc, "mlartifacts") if storage.is_uri(loc) else Path(loc, "mlartifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str, storage_loc: str | None = None) -> str:
    """The experiment's id, creating it with its artifact location (see :func:`artifact_location`) when new; new and
    existing experiments are tagged as model-training experiments."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # created before the tag, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, storage_loc),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def metric_key(name: str) -> str:
    """The MLflow key of a training statistic: ``kimg`` -> ``progress/kimg``, ``fid50k`` -> ``metrics/fid50k``,
    ``time_fid50k`` -> ``time/fid50k``; keys with a "/" are kept."""
    if "/" in name:
        return name
    if name in _GROUPED:
        return _GROUPED[name]
    if name.startswith("time_"):
        return "time/" + name[len("time_"):]
    return "metrics/" + name


def stat_name(key: str) -> str:
    """Inverse of :func:`metric_key` (``metrics/fid50k`` -> ``fid50k``); flat keys of runs logged before the
    grouping map to the same names (``kimg`` -> ``kimg``, ``loss_G`` -> ``loss/G``)."""
    if key in _UNGROUPED:
        return _UNGROUPED[key]
    group, _, rest = key.partition("/")
    if rest:
        if group == "metrics":
            return rest
        if group == "time":
            return "time_" + rest
        return key
    for g in _LEGACY_GROUPS:
        if key.startswith(g + "_"):
            return f"{g}/{key[len(g) + 1:]}"
    return key


def stat_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's latest metric values keyed by statistic name (see :func:`stat_name`)."""
    return {stat_name(k): v for k, v in metrics.items()}


def check_tracking(uri: str) -> None:
    """Fail early, with one sentence, when the tracking store cannot be reached or refuses the credentials (a local
    sqlite file is not opened here: that would create it)."""
    if uri.startswith("sqlite:"):
        return
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as e:
        text = str(e).strip().splitlines()
        msg = (text[0] if text else type(e).__name__)[:240].rstrip(".")
        if "401" in msg or "403" in msg or "nauthorized" in msg or "ermission" in msg:
            raise TrackingError(f"The MLflow tracking server {uri} refused the credentials; set "
                                f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.") from None
        raise TrackingError(f"Cannot reach the MLflow tracking store {uri}: {msg}.") from None


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
    (STORAGE/RUN/checkpoint_*/ckpt.pt or STORAGE/RUN/checkpoints/ckpt-*.pt); None when there is neither. For an
    MLflow model URI (models:/NAME/VERSION), the store beside the default storage, where training registers it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_uri(os.environ["MLFLOW_TRACKING_URI"])
    if isinstance(checkpoint, str) and checkpoint.startswith(("models:/", "runs:/")):
        try:
            return resolve_tracking_uri(storage.default_storage(), create=False)
        except TrackingError:
            return None
    if checkpoint and storage.local_path(checkpoint) is not None:
        for parent in list(Path(checkpoint).expanduser().resolve().parents)[:4]:
            if (parent / "mlflow.db").is_file():
                return f"sqlite:///{parent / 'mlflow.db'}"
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_run(uri: str, experiment: str, run_name: str, params: dict[str, str],
               tags: dict[str, str] | None = None, storage_loc: str | None = None) -> str:
    client = _client(uri)
    exp_id = ensure_experiment(uri, experiment, storage_loc)
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
        """Numbers among ``metrics`` (statistic names, see :func:`metric_key`) at ``step`` (images seen)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_LOGGED]
        for i in range(0, len(items), 200):
            self.client.log_batch(self.run_id, metrics=items[i:i + 200])

    def log_image(self, image: str | Path | Any, key: str, step: int) -> None:
        """A time-stepped image (the UI's image panel scrolls through the steps of ``key``): a PNG given as a
        local path or storage location, or a PIL image / HxWxC uint8 array."""
        if isinstance(image, (str, Path)):
            import io

            from PIL import Image

            with Image.open(io.BytesIO(storage.read_bytes(image))) as im:
                image = im.convert("RGB")
        self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file given as a local path or a storage location (downloaded to a temporary file first)."""
        if storage.local_path(path) is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="sgd-artifact-") as tmp:
            local = storage.download(path, Path(tmp) / storage.name(path))
            self.client.log_artifact(self.run_id, str(local), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def terminate(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which a time-stepped image ``key`` was logged (``MlflowClient.log_image(key=, step=)`` names its
    files ``images/<key, / as ~>+step+<step>+...``)."""
    prefix = f"images/{key.replace('/', '~')}+step+"
    return sorted(int(a.path[len(prefix):].split("+")[0]) for a in client.list_artifacts(run_id, "images")
                  if a.path.startswith(prefix) and a.path.endswith(".png"))


def run_url_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} (MLFLOW_TRACKING_URI) in a browser, or: mlflow ui --backend-store-uri {uri}"
