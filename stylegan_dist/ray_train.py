"""The Ray entry layer: a TorchTrainer whose workers run the core training loop on their Ray Data shard.

Only this module (and the sweep launcher) imports ``ray``. Each worker:
  * gets rank / world size / device from Ray Train (gloo on CPU, NCCL on GPU: the process group is
    Ray's), reads its split of the per-resolution Ray datasets through ``RayBatchSource``;
  * resumes from ``ray.train.get_checkpoint()`` when Ray restarts it after a failure, or when the
    same run (storage + name) is started again;
  * reports at every tick: metrics on every rank, the checkpoint from rank 0 (Ray persists it under
    STORAGE/RUN_NAME/checkpoint_* and keeps the newest K);
  * rank 0 logs metrics and sample grids to the run's MLflow run, whose id travels in the config and
    in every checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CKPT_FILE = "ckpt.pt"
META_FILE = "meta.json"


def init_ray():
    """Connect to the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local Ray instance."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Small machines need at least 4 logical CPUs for the workers, Ray Data and the Train controller.
        ray.init(num_cpus=max(4, os.cpu_count() or 1))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from data_pipeline.stream import RayBatchSource

    from .checkpoint import load_checkpoint
    from .config import from_dict
    from .loop import NonFiniteLossError, training_loop
    from .tracking import RunLogger

    # Ray Train logs every report at INFO and routes print() through its logger; keep the driver's
    # console to one progress line per tick.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # the per-report INFO line comes from a logger named after its file, outside "ray.train"
        from ray.train.v2._internal.execution import context as _train_ctx

        logging.getLogger(_train_ctx.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    run_dir = Path(config["run_dir"])
    if config.get("pid_dir"):  # lets tests (and operators) find and signal worker processes
        Path(config["pid_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(config["pid_dir"]) / f"rank{rank}.pid").write_text(str(os.getpid()))

    resume = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            resume = load_checkpoint(Path(d) / CKPT_FILE, map_location=device)
    run_id = config["mlflow_run_id"]
    if resume is not None:
        run_id = resume.get("extra", {}).get("mlflow_run_id", run_id)
    logger = RunLogger(config["tracking_uri"], run_id) if rank == 0 else None
    local_ckpts = Path(tempfile.mkdtemp(prefix=f"sgd-ckpt-r{rank}-"))
    source = RayBatchSource(config["data"], seed=cfg.train.seed, mirror=cfg.train.mirror, rank=rank)

    def report(stats: dict[str, Any], ckpt_path: Path | None) -> None:
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if logger is not None:
            logger.log_metrics(metrics, step=int(stats["cur_nimg"]))
            if stats.get("grid"):
                logger.log_artifact(stats["grid"], "samples")
        if ckpt_path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sgd-report-") as tmp:
            shutil.move(str(ckpt_path), Path(tmp) / CKPT_FILE)
            meta = {"cur_nimg": int(stats["cur_nimg"]), "kimg": stats["kimg"], "mlflow_run_id": run_id}
            (Path(tmp) / META_FILE).write_text(json.dumps(meta))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    try:
        training_loop(
            cfg, source, run_dir, rank=rank, world_size=world_size, device=device, resume=resume, report=report,
            extra_state={"mlflow_run_id": run_id}, checkpoint_dir=local_ckpts, metrics_data=config["data"],
            log=_console if rank == 0 else None, stop_after_ticks=config.get("max_ticks"),
        )
    except NonFiniteLossError as e:
        if logger is not None:
            logger.set_tag("stopped", str(e))
        raise
    finally:
        source.close()  # stops Ray Data iterator threads before the worker is torn down
        shutil.rmtree(local_ckpts, ignore_errors=True)


def _console(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def registered_checkpoints(run_dir: Path) -> set[str] | None:
    """Checkpoint directories Ray has registered for the run (None when Ray wrote no snapshot yet).

    A checkpoint is registered once every worker has made the report that carried it; a directory persisted
    by rank 0 whose report never completed (a worker died in between) is not resumed from by Ray."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snap.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return None
    return {r["checkpoint_dir_name"] for r in results if "checkpoint_dir_name" in r}


def latest_checkpoint_meta(run_dir: Path) -> dict[str, Any] | None:
    """The newest registered Ray checkpoint of a run (by cur_nimg), from its small sidecar file."""
    registered = registered_checkpoints(run_dir)
    best = None
    for meta_path in run_dir.glob(f"checkpoint_*/{META_FILE}"):
        if registered is not None and meta_path.parent.name not in registered:
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if (meta_path.parent / CKPT_FILE).is_file() and (best is None or meta["cur_nimg"] > best["cur_nimg"]):
            best = {**meta, "path": str(meta_path.parent)}
    return best


def build_trainer(cfg_dict: dict[str, Any], *, data: str, run_dir: Path, workers: int, use_gpu: bool,
                  cpus_per_worker: float, tracking_uri: str, mlflow_run_id: str, max_failures: int,
                  keep_checkpoints: int, max_ticks: int | None = None, pid_dir: str | None = None,
                  callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline.stream import make_ray_datasets

    from .config import from_dict

    cfg = from_dict(cfg_dict)
    levels = [r for r in (2**i for i in range(2, 14)) if cfg.schedule.start_resolution <= r <= cfg.model.resolution]
    datasets = make_ray_datasets(data, levels, seed=cfg.train.seed)
    loop_config = {
        "cfg": cfg_dict, "data": str(Path(data).resolve()), "run_dir": str(run_dir), "tracking_uri": tracking_uri,
        "mlflow_run_id": mlflow_run_id, "max_ticks": max_ticks, "pid_dir": pid_dir,
        "threads_per_worker": max(1, int(cpus_per_worker)),
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )
