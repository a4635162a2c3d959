"""The Ray entry layer of ``python -m stylegan_dist.evaluate``: the metrics of a checkpoint on N Ray Train
workers (GPU with NCCL, or CPU with gloo).

Every worker loads the checkpoint's G_ema and the feature extractors, and runs the same metric functions as
the training-time metrics with its rank and the torch.distributed all-gather: chunk k of the samples goes to
rank k % N and the partial statistics are combined once, so the values equal the single-process ones
(``--no-ray``) for the same seeds, batch size and device type. Rank 0 prints the progress; every rank
reports the (identical) results and the driver takes rank 0's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from .metrics import MetricError

RESULTS_FILE = "results.json"


def eval_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from .evaluate import build_options, load_extractors, run_metrics
    from .metrics import torch_distributed_gather

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    args = argparse.Namespace(**config["args"])
    say = print if rank == 0 else (lambda _msg: None)
    opts, _ = build_options(args, device, rank=rank, world_size=world_size, gather=torch_distributed_gather,
                            progress=say)
    load_extractors(opts, config["names"])
    results = run_metrics(opts, config["names"], say=say)
    # Ray Train keeps the metrics of reports that carry a checkpoint: rank 0 hands its results over as one.
    if rank != 0:
        ray.train.report({"rank": rank})
        return
    with tempfile.TemporaryDirectory(prefix="sgd-eval-report-") as tmp:
        (Path(tmp) / RESULTS_FILE).write_text(json.dumps({"results": results, "device": str(device)}))
        ray.train.report({"rank": rank}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def plan_workers(args: argparse.Namespace, resources: dict) -> tuple[int, bool]:
    """(workers, use_gpu): one worker per GPU of the cluster by default, else one CPU worker."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if args.gpu and gpus == 0:
        raise MetricError("--gpu was given but the Ray cluster has no GPUs; drop --gpu to evaluate on CPU workers.")
    use_gpu = args.gpu or (gpus > 0 and not args.cpu)
    workers = args.workers if args.workers is not None else (gpus if use_gpu else 1)
    if use_gpu and workers > gpus:
        raise MetricError(f"{workers} GPU workers were asked for but the Ray cluster has {gpus} GPUs; lower "
                          f"--workers or add GPU nodes.")
    if args.cpus_per_worker <= 0 or workers * args.cpus_per_worker > cpus:
        raise MetricError(f"{workers} workers x {args.cpus_per_worker:g} CPUs do not fit the Ray cluster's "
                          f"{cpus:g} CPUs; lower --workers or --cpus-per-worker.")
    return workers, use_gpu


def _absolute_args(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The command's options with every path made absolute and the weight files resolved here, so that
    workers started elsewhere read the same files."""
    from . import storage
    from .metrics.registry import extractors_needed
    from .metrics.weights import locate_weight
    from .mlflow_model import is_model_uri

    out = dict(vars(args))
    for key in ("checkpoint", "data", "cache_dir"):
        if out.get(key) and not is_model_uri(out[key]):
            out[key] = storage.resolve(out[key])  # absolute path or storage URI
    kinds = {"inception": ["inception"], "lpips": ["vgg16", "lpips"], "classifier": ["classifier"]}
    for need in extractors_needed(names):
        for kind in kinds[need]:
            out[kind] = locate_weight(kind, out.get(kind))  # a URI is copied locally by each worker's node
    return out


def evaluate_on_ray(args: argparse.Namespace, names: list[str], info: dict) -> tuple[list[dict], str]:
    """Run the metrics on Ray workers -> (calc_metric results of rank 0, a description of the workers)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_train import failure_message, init_ray

    ray = init_ray()
    workers, use_gpu = plan_workers(args, ray.cluster_resources())
    res = info["resolution"]
    kind = "GPU" if use_gpu else "CPU"
    print(f"Evaluating {args.checkpoint} (kimg {info['cur_nimg'] / 1000:.1f}, {res}x{res}, alpha "
          f"{info['alpha']:.2f}) on {workers} Ray {kind} worker(s): {', '.join(names)}")
    from . import storage

    # Ray Train's working storage carries only rank 0's results back; every node must reach it: --storage, else
    # $STYLEGAN_DIST_STORAGE (a URI on a cluster), else a temporary directory (enough for a one-node cluster).
    own_storage = not getattr(args, "storage", None) and not os.environ.get(storage.STORAGE_ENV)
    if own_storage:
        root = tempfile.mkdtemp(prefix="sgd-eval-")
    else:
        root = storage.check_storage_arg(getattr(args, "storage", None))
    name = f"evaluate-{uuid.uuid4().hex[:12]}"
    fs, fs_path = storage.filesystem(root)
    try:
        trainer = TorchTrainer(
            eval_worker,
            train_loop_config={"args": _absolute_args(args, names), "names": names,
                               "threads_per_worker": max(1, int(args.cpus_per_worker))},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": args.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=name, storage_path=fs_path,
                                           storage_filesystem=fs if storage.is_uri(root) else None,
                                           failure_config=ray.train.FailureConfig(max_failures=0)),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # the workers' one-sentence MetricError inside Ray's TrainingFailedError
            raise MetricError(f"Evaluation on Ray failed: {_sentence(failure_message(e))}") from None
        if result.checkpoint is None:
            raise MetricError("Evaluation on Ray ended without results; see the workers' output above.")
        with result.checkpoint.as_directory() as d:
            out = json.loads((Path(d) / RESULTS_FILE).read_text())
    finally:
        if own_storage:
            shutil.rmtree(root, ignore_errors=True)
        else:
            try:
                storage.delete(storage.join(root, name))
            except storage.StorageError:
                pass
    return out["results"], f"{workers} Ray {kind} worker(s) ({out['device']})"


def _sentence(text: str) -> str:
    return text.rstrip(".") + "."
