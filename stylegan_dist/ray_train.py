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
import time
from pathlib import Path
from typing import Any

CKPT_FILE = "ckpt.pt"
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _started_cluster_address() -> str | None:
    """The address the last ``ray start --head`` on this machine recorded (in RAY_TMPDIR, default /tmp/ray): the
    cluster a plain ``ray.init()`` would join. None when no cluster was started here."""
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # a Ray without the helper: behave as if none was started
        return None
    return read_ray_address(None) or None


def init_ray(num_cpus: int | None = None, log=print):
    """Connect to the Ray cluster in RAY_ADDRESS (as under ``ray job submit``), else to the cluster ``ray start``
    made on this machine, else start a local Ray instance of ``num_cpus`` logical CPUs (at least 4)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS") or _started_cluster_address()
    try:
        if address:
            ray.init(address=address)
            if not os.environ.get("RAY_ADDRESS"):
                log(f"Connected to the running Ray cluster at {address} (started with `ray start`).")
        else:
            # Small machines need at least 4 logical CPUs for the workers, Ray Data and the Train controller.
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1))
            log("Started a local Ray instance (no cluster was running; `ray start --head` makes one).")
    except Exception as e:  # AuthenticationError, an unreachable or stale address, ...
        text = str(e).strip().splitlines()
        first = (text[0] if text else type(e).__name__)[:200].rstrip(".")
        if type(e).__name__ == "AuthenticationError" or "uthenticat" in str(e):
            raise RayConnectError(f"The Ray cluster at {address} requires token authentication and no valid token "
                                  f"was found; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on "
                                  f"the head node) or RAY_AUTH_TOKEN_PATH.") from None
        if address and (isinstance(e, (ConnectionError, TimeoutError)) or "connect" in str(e).lower()):
            hint = "" if os.environ.get("RAY_ADDRESS") else " (the address the last `ray start` on this machine " \
                "recorded; start that cluster again, or set RAY_ADDRESS)"
            raise RayConnectError(f"Cannot connect to the Ray cluster at {address}{hint}: {first}.") from None
        raise
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


class RayConnectError(RuntimeError):
    """No usable Ray cluster; the message is one sentence."""


def failure_message(e: BaseException) -> str:
    """The message that explains a Ray Train failure: a worker's "Training stopped: ..." sentence when there is one,
    else the innermost error line (the workers' errors are nested in Ray's TrainingFailedError)."""
    seen = set()
    msgs = []
    stack = [e]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        for attr in ("worker_failures", "errors"):
            inner = getattr(cur, attr, None)
            if isinstance(inner, dict):
                stack.extend(v for v in inner.values() if isinstance(v, BaseException))
        if cur.__cause__ is not None:
            stack.append(cur.__cause__)
        text = str(cur).strip().splitlines()
        if text:
            msgs.append(text[-1])
    for m in msgs:
        if "Training stopped:" in m:
            return m[m.index("Training stopped:"):]
    return msgs[-1] if msgs else type(e).__name__


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from data_pipeline.stream import RayBatchSource

    from .checkpoint import load_checkpoint
    from .config import from_dict
    from .loop import NonFiniteLossError, training_loop
    from .run_tracking import RunTracker

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
    run_dir = config["run_dir"]  # local path or storage URI
    if config.get("pid_dir"):  # lets tests (and operators) find and signal worker processes and their nodes
        Path(config["pid_dir"]).mkdir(parents=True, exist_ok=True)
        node = ray.get_runtime_context().get_node_id()
        (Path(config["pid_dir"]) / f"rank{rank}.pid").write_text(f"{os.getpid()} {node}")

    resume = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            resume = load_checkpoint(Path(d) / CKPT_FILE, map_location=device)
    run_id = config["mlflow_run_id"]
    if resume is not None:
        run_id = resume.get("extra", {}).get("mlflow_run_id", run_id)
    node_index, node_leader = _node_of(rank, world_size)
    tracker = RunTracker(config["tracking_uri"], run_id, cfg, config["model_name"], rank=rank,
                         node_leader=node_leader, node=f"node_{node_index}", log=_console)
    local_ckpts = Path(tempfile.mkdtemp(prefix=f"sgd-ckpt-r{rank}-"))
    source = RayBatchSource(config["data"], seed=cfg.train.seed, mirror=cfg.train.mirror, rank=rank)

    def report(stats: dict[str, Any], ckpt_path: str | None) -> None:
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.tick(stats)
        if ckpt_path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="sgd-report-") as tmp:
            shutil.move(str(ckpt_path), Path(tmp) / CKPT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # Ray's checkpoint metadata (public API): what the driver needs to continue the run without
            # downloading the checkpoint itself.
            checkpoint.set_metadata({"cur_nimg": int(stats["cur_nimg"]), "kimg": stats["kimg"],
                                     "mlflow_run_id": run_id, "config": config["cfg"]})
            ray.train.report(metrics, checkpoint=checkpoint)

    try:
        training_loop(
            cfg, source, run_dir, rank=rank, world_size=world_size, device=device, resume=resume, report=report,
            extra_state={"mlflow_run_id": run_id}, checkpoint_dir=local_ckpts, metrics_data=config["data"],
            log=_console if rank == 0 else None, stop_after_ticks=config.get("max_ticks"),
            on_generator=tracker.generator,
        )
    except NonFiniteLossError as e:
        if tracker.logger is not None and rank == 0:
            tracker.logger.set_tag("stopped", str(e))
        raise
    finally:
        tracker.close()
        source.close()  # stops Ray Data iterator threads before the worker is torn down
        shutil.rmtree(local_ckpts, ignore_errors=True)


def _node_of(rank: int, world_size: int) -> tuple[int, bool]:
    """(index of this worker's Ray node, numbered by the lowest rank on each; whether this is that rank). Ray
    Train's node rank and local rank count nodes by IP address, which several Ray nodes on one machine share; the
    Ray node id tells them apart. A collective: every rank calls it."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world_size > 1:
        nodes = [None] * world_size
        dist.all_gather_object(nodes, node)
    first = list(dict.fromkeys(nodes))  # node ids in order of their lowest rank
    return first.index(node), nodes.index(node) == rank


def _console(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """The checkpoints Ray Train has registered for a run (local path or storage URI), oldest first, read through
    Ray's public ``Result.from_path``: a checkpoint is registered once every worker has made the report that
    carried it, so a directory persisted by rank 0 whose report never completed is not listed. Each entry:
    ``cur_nimg``, ``kimg``, ``mlflow_run_id``, ``config``, ``path`` (location of the checkpoint directory) and
    ``checkpoint`` (the ``ray.train.Checkpoint``). Empty when the run has none (or does not exist)."""
    from ray.train import Result

    from . import storage

    fs, fs_path = storage.filesystem(run_dir)
    if not storage.exists(run_dir):
        return []
    # Restoring logs "A run snapshot was found ..." at INFO every time; this is a query, not a restore.
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for attempt in range(3):
            try:
                result = Result.from_path(fs_path, storage_filesystem=fs)
                break
            except RuntimeError:  # no Ray Train snapshot in that directory yet
                return []
            except Exception:  # the snapshot caught while Ray rewrites it: read it again
                if attempt == 2:
                    raise
                time.sleep(0.5)
    finally:
        quiet.setLevel(level)
    out = []
    for checkpoint, metrics in result.best_checkpoints:
        meta = checkpoint.get_metadata()
        if "cur_nimg" not in meta:  # written before checkpoints carried Ray metadata: our own sidecar file
            try:
                meta = json.loads(storage.read_text(storage.join(storage.uri_of(checkpoint.path, run_dir),
                                                                 "meta.json")))
            except (OSError, ValueError):
                continue
        out.append({**meta, "path": storage.uri_of(checkpoint.path, run_dir), "checkpoint": checkpoint,
                    "metrics": metrics})
    return sorted(out, key=lambda m: m["cur_nimg"])


def latest_checkpoint_meta(run_dir: str) -> dict[str, Any] | None:
    """The newest registered checkpoint of a run (by cur_nimg), or None (see :func:`run_checkpoints`)."""
    found = run_checkpoints(run_dir)
    return found[-1] if found else None


def build_trainer(cfg_dict: dict[str, Any], *, data: str, run_dir: str, workers: int, use_gpu: bool,
                  cpus_per_worker: float, tracking_uri: str, mlflow_run_id: str, max_failures: int,
                  keep_checkpoints: int, max_ticks: int | None = None, pid_dir: str | None = None,
                  callbacks: list | None = None, placement: str = "PACK", model_name: str | None = None):
    """A TorchTrainer for one run. ``run_dir`` (local path or storage URI) is Ray Train's ``storage_path/name``:
    Ray persists the checkpoints there itself, and a trainer built again for the same ``run_dir`` continues from
    the newest one. G_ema is registered in MLflow under ``tracking.model_name``, else ``model_name``, else the run's
    directory name."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_pipeline.stream import make_ray_datasets

    from . import storage
    from .config import from_dict

    cfg = from_dict(cfg_dict)
    levels = [r for r in (2**i for i in range(2, 14)) if cfg.schedule.start_resolution <= r <= cfg.model.resolution]
    datasets = make_ray_datasets(data, levels, seed=cfg.train.seed)
    storage_fs, storage_path = storage.filesystem(storage.parent(run_dir))
    if not storage.is_uri(run_dir):
        storage_fs = None  # Ray's own local filesystem handling
    loop_config = {
        "cfg": cfg_dict, "data": storage.resolve(data), "run_dir": storage.resolve(run_dir),
        "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id, "max_ticks": max_ticks, "pid_dir": pid_dir,
        "threads_per_worker": max(1, int(cpus_per_worker)),
        "model_name": cfg.tracking.model_name or model_name or storage.name(run_dir),
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, placement_strategy=placement,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=storage.name(run_dir),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
        datasets=datasets,
    )
