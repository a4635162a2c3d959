"""G_ema as an MLflow model: logged with ``mlflow.pytorch``, registered in the Model Registry, loaded back by name.

The logged module is :class:`ExportedGenerator`: ``forward(z)`` maps latents ``[N, latent_dim]`` (float32) to images
``[N, C, R, R]`` in [-1, 1] at the resolution the run had reached, with the run's visualisation truncation
(``generator.truncation_psi``) and fresh noise, so ``mlflow.pyfunc.load_model(uri).predict(z)`` gives pictures.
It is saved with pickle, not ``torch.export``'s graph format, so that it loads back as this module (``stylegan_dist``
must be importable where it is loaded; load models only from a registry you trust) and carries the run's config,
image count and run id, so ``generate``, ``figures`` and ``evaluate`` take ``models:/NAME/VERSION``,
``models:/NAME@ALIAS`` or ``runs:/RUN_ID/G_ema`` wherever they take a checkpoint.

Training registers a version at its end and, when metrics run, at every new best of the first FID metric, which
also moves the alias ``best`` to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from .checkpoint import CheckpointError

MODEL_URI_PREFIXES = ("models:/", "runs:/")
ARTIFACT_NAME = "G_ema"
BEST_ALIAS = "best"


class ModelError(CheckpointError):
    """A model URI that cannot be used; the message is one sentence (a CheckpointError: the commands take either)."""


def is_model_uri(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(MODEL_URI_PREFIXES)


class ExportedGenerator(torch.nn.Module):
    """z -> image with the settings a run's sample grids use (see the module docstring)."""

    def __init__(self, G: torch.nn.Module, config: dict[str, Any], cur_nimg: int, resolution: int, alpha: float,
                 truncation_psi: float, truncation_cutoff: int, run_id: str | None):
        super().__init__()
        self.G = G
        self.config = config
        self.cur_nimg, self.resolution, self.alpha = int(cur_nimg), int(resolution), float(alpha)
        self.truncation_psi, self.truncation_cutoff = float(truncation_psi), int(truncation_cutoff)
        self.run_id = run_id

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.as_tensor(z, dtype=torch.float32)
        return self.G(z, self.resolution, self.alpha, truncation_psi=self.truncation_psi,
                      truncation_cutoff=self.truncation_cutoff)


def export_generator(G_ema: torch.nn.Module, cfg: Any, cur_nimg: int, run_id: str | None = None
                     ) -> ExportedGenerator:
    """A CPU copy of G_ema wrapped for MLflow (the training copy is left where it is)."""
    from .config import to_dict
    from .networks import build_generator
    from .schedule import phase_at

    G = build_generator(cfg)
    G.load_state_dict(G_ema.state_dict())  # copies into the new CPU tensors
    G = G.eval().requires_grad_(False)
    phase = phase_at(cfg, cur_nimg)
    return ExportedGenerator(G, to_dict(cfg), cur_nimg, phase.resolution, phase.alpha,
                             cfg.generator.truncation_psi, cfg.generator.truncation_cutoff, run_id)


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent model functions read the process-wide tracking URI; set it for the call only."""
    import mlflow

    before, env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _requirements() -> list[str]:
    import mlflow
    import numpy

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
            f"mlflow=={mlflow.__version__}"]


def log_generator(uri: str, run_id: str, G_ema: torch.nn.Module, cfg: Any, cur_nimg: int, name: str, *,
                  alias: str | None = None, tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Log G_ema into the run as an MLflow model and register it as a new version of ``name`` (alias moved to it
    when given); returns ``(model_uri, version)`` with ``model_uri = models:/NAME/VERSION``."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    model = export_generator(G_ema, cfg, cur_nimg, run_id)
    example = np.random.RandomState(0).randn(2, model.G.latent_dim).astype(np.float32)
    signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickle: chosen, see the module docstring
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with _tracking(uri):
        try:
            info = mlflow.pytorch.log_model(
                model, name=ARTIFACT_NAME, run_id=run_id, signature=signature, input_example=example,
                registered_model_name=name, pip_requirements=_requirements(), serialization_format="pickle",
                step=int(cur_nimg))
        finally:
            quiet.setLevel(level)
    version = str(info.registered_model_version)
    client = MlflowClient(uri)
    for k, v in {"kimg": f"{cur_nimg / 1000:g}", "resolution": str(model.resolution), **(tags or {})}.items():
        client.set_model_version_tag(name, version, k, v)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return f"models:/{name}/{version}", version


def load_exported(model_uri: str, tracking_uri: str, device: torch.device | str = "cpu"
                  ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(G in eval mode, config, info)`` from a registered or logged model, as ``generate.load_generator``."""
    import mlflow.pytorch

    from .config import ConfigError, from_dict

    try:
        with _tracking(tracking_uri):
            model = mlflow.pytorch.load_model(model_uri, map_location=torch.device(device))
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200].rstrip(".")
        raise ModelError(f"Model {model_uri} could not be loaded from the tracking store {tracking_uri}: "
                         f"{text}.") from None
    if not isinstance(model, ExportedGenerator):
        raise ModelError(f"Model {model_uri} is not a stylegan_dist generator (it is a {type(model).__name__}).")
    try:
        cfg = from_dict(model.config)
    except ConfigError as e:
        raise ModelError(f"Model {model_uri} carries a config this version cannot read: {e}") from None
    G = model.G.to(device).eval().requires_grad_(False)
    info = {"cur_nimg": model.cur_nimg, "resolution": model.resolution, "alpha": model.alpha,
            "extra": {"mlflow_run_id": model.run_id} if model.run_id else {}}
    return G, cfg, info


def default_tracking_uri() -> str:
    """Where ``models:/`` URIs are looked up: MLFLOW_TRACKING_URI, else the store beside the default storage
    (``$STYLEGAN_DIST_STORAGE``, else ./runs), which is where ``train`` registers without a server."""
    from . import storage
    from .tracking import TrackingError, resolve_tracking_uri

    try:
        return resolve_tracking_uri(storage.default_storage(), create=False)
    except TrackingError as e:
        raise ModelError(str(e)) from None
