"""``python -m stylegan_dist.train``: train StyleGAN with progressive growing on a prepared dataset.

Runs on Ray Train: connects to the cluster in RAY_ADDRESS (as under ``ray job submit``) or starts a
local Ray instance, and runs one worker per GPU (or N CPU workers with gloo). Each worker streams its
share of the dataset through Ray Data and runs the core training loop; gradients are averaged
across workers.

A run lives in STORAGE/RUN_NAME: config.yaml, Ray checkpoints (checkpoint_*/ckpt.pt, newest K kept),
samples/ (a grid per tick), and one MLflow run (MLFLOW_TRACKING_URI, else STORAGE/mlflow.db). STORAGE and
--data are local paths or object-storage URIs (s3://bucket/prefix, gs://..., S3-compatible servers through
AWS_ENDPOINT_URL); on a cluster without a shared disk, use a URI and a tracking server.
Running the same command again continues the run from its newest checkpoint, logging to the same
MLflow run; a failed worker is restarted from the newest checkpoint automatically (--max-failures);
--restart moves the old run aside and starts over.

Examples:
  python -m data_pipeline.synthetic data/shapes32 --num-images 2048 --resolution 32
  python -m stylegan_dist.train --config configs/demo.yaml --data data/shapes32 --storage runs --workers 2
  ray job submit --working-dir . -- python -m stylegan_dist.train --data s3://bucket/ffhq1024 --gpu --workers 8
      (on a cluster whose nodes set STYLEGAN_DIST_STORAGE=s3://bucket/runs and MLFLOW_TRACKING_URI)
  python -m stylegan_dist.train --data /data/ffhq --dry-run           # resolved config + schedule, then exit
  python -m stylegan_dist.train --data data/shapes32 --no-ray          # the core loop in this process
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt_mod
from . import storage
from .cli import add_config_args, config_from_args, fail
from .config import Config, ConfigError, flat_params, from_dict, to_dict, to_yaml
from .ray_train import RayConnectError, failure_message
from .schedule import format_schedule
from .tracking import (
    DEFAULT_EXPERIMENT,
    RunLogger,
    TrackingError,
    check_tracking,
    create_run,
    resolve_tracking_uri,
    run_exists,
    run_url_hint,
)

# Sections whose change makes an existing checkpoint unusable (different networks).
_SHAPE_SECTIONS = ("model", "generator", "discriminator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", metavar="DIR|URI", help="dataset made by data_pipeline.prepare or "
                    "data_pipeline.synthetic (manifest.json and Parquet shards): a directory or a URI such as "
                    "s3://bucket/ffhq1024")
    add_config_args(ap)
    ap.add_argument("--workers", type=int, metavar="N", help="training workers: default one per GPU in the "
                    "cluster, or 1 CPU worker when it has none")
    ap.add_argument("--gpu", action="store_true", help="use GPU workers (one GPU each, NCCL); an error if the "
                    "cluster has too few GPUs. Default: GPUs when the cluster has any")
    ap.add_argument("--cpu", action="store_true", help="use CPU workers (gloo) even when GPUs are present")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                    help="CPUs reserved per worker, also its torch thread count (default 1)")
    ap.add_argument("--storage", metavar="DIR|URI", help="where runs are stored: a directory, or on a multi-node "
                    "cluster an absolute shared path or an object-storage URI (s3://bucket/runs). Default: "
                    f"${storage.STORAGE_ENV}, else ./runs (refused inside a Ray job, whose working directory is "
                    "temporary)")
    ap.add_argument("--run-name", metavar="NAME", help="run directory name under --storage (default: the "
                    "config file's name, or 'stylegan'); an existing run of this name is continued")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name "
                    f"(default {DEFAULT_EXPERIMENT})")
    ap.add_argument("--restart", action="store_true", help="move the existing run of this name aside "
                    "(RUN_NAME.old-TIMESTAMP) and start from scratch")
    ap.add_argument("--max-failures", type=int, default=3, metavar="N", help="worker failures tolerated; "
                    "each restarts the workers from the newest checkpoint (default 3)")
    ap.add_argument("--placement", default="PACK", choices=ray_placements(), type=str.upper,
                    help="Ray placement of the workers: PACK (default, fewest nodes) or SPREAD (one per node where "
                    "possible), or the STRICT_ variants")
    ap.add_argument("--max-ticks", type=int, metavar="N", help="stop after N ticks of this invocation, with a "
                    "checkpoint (run the same command again to continue)")
    ap.add_argument("--no-ray", action="store_true", help="run the core loop in this process without Ray "
                    "(one CPU or GPU; --device picks it)")
    ap.add_argument("--device", default="auto", help="with --no-ray: auto, cpu, cuda or cuda:N")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and the schedule table "
                    "(kimg -> resolution, batch, lr) for --workers, then exit")
    return ap.parse_args(argv)


def ray_placements() -> tuple[str, ...]:
    return ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_resume_compatible(cfg: Config, ckpt_cfg: dict, where: str) -> None:
    new = to_dict(cfg)
    changed = [f"{s}.{k}" for s in _SHAPE_SECTIONS for k in new[s] if new[s][k] != ckpt_cfg.get(s, {}).get(k)]
    if changed:
        raise ConfigError(f"The existing run {where} was made with different networks ({', '.join(changed)}); "
                          f"use another --run-name or --restart.")


def check_dataset(data: str | None, cfg: Config) -> dict:
    from data_pipeline.stream import DatasetError, open_manifest

    if not data:
        raise ConfigError("--data is required: give a dataset directory made by data_pipeline.prepare or "
                          "data_pipeline.synthetic.")
    try:
        manifest = open_manifest(data)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    have = sorted(manifest["resolutions"])
    needed = [r for r in (2**i for i in range(2, 14)) if cfg.schedule.start_resolution <= r <= cfg.model.resolution]
    missing = [r for r in needed if r not in have]
    if missing:
        raise ConfigError(f"Dataset {data} has resolutions {have[0]}..{have[-1]} but training needs "
                          f"{needed[0]}..{needed[-1]}; set model.resolution to at most {have[-1]} or prepare "
                          f"the data at {cfg.model.resolution}.")
    return manifest


_METRIC_FILES = {"inception": ("inception_weights",), "lpips": ("vgg16_weights", "lpips_weights"),
                 "classifier": ("classifier",)}


def absolute_metric_files(cfg: Config) -> Config:
    """The local paths under ``metrics.*`` made absolute (Ray workers run in Ray's copy of the working directory,
    where a relative path points nowhere), and the weight files the training-time metrics need checked now rather
    than at the first metrics tick."""
    from .config import apply_overrides

    m = cfg.metrics
    fixed = {}
    for key in ("data", "cache_dir", "inception_weights", "vgg16_weights", "lpips_weights", "classifier"):
        value = getattr(m, key)
        if value and not storage.is_uri(value):
            fixed[f"metrics.{key}"] = storage.resolve(value)
    cfg = apply_overrides(cfg, fixed, "metrics paths") if fixed else cfg
    if cfg.metrics.names.strip():
        from .metrics.registry import extractors_needed, parse_metric_list

        for need in sorted(extractors_needed(parse_metric_list(cfg.metrics.names))):
            for key in _METRIC_FILES[need]:
                value = getattr(cfg.metrics, key)
                if value and not storage.is_uri(value) and not Path(value).is_file():
                    raise ConfigError(f"metrics.{key} {value} does not exist (needed by metrics.names "
                                      f"{cfg.metrics.names}).")
    return cfg


def _run_name(args: argparse.Namespace) -> str:
    name = args.run_name or (Path(args.config).stem if args.config else "stylegan")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--run-name '{name}' must be a plain directory name.")
    return name


def _move_aside(run_dir: str) -> str:
    target = storage.join(storage.parent(run_dir), f"{storage.name(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    return storage.move(run_dir, target)


def _plan_workers(args: argparse.Namespace, resources: dict) -> tuple[int, bool]:
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    use_gpu = args.gpu or (gpus > 0 and not args.cpu)
    if args.gpu and gpus == 0:
        raise ConfigError("--gpu was given but the Ray cluster has no GPUs; drop --gpu to train on CPU workers.")
    workers = args.workers if args.workers is not None else (gpus if use_gpu else 1)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}.")
    if use_gpu and workers > gpus:
        raise ConfigError(f"{workers} GPU workers were asked for but the Ray cluster has {gpus} GPUs; lower "
                          f"--workers or add GPU nodes.")
    if workers * args.cpus_per_worker > cpus:
        raise ConfigError(f"{workers} workers x {args.cpus_per_worker:g} CPUs do not fit the Ray cluster's "
                          f"{cpus:g} CPUs; lower --workers or --cpus-per-worker.")
    return workers, use_gpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            print(to_yaml(cfg))
            print(f"Schedule for {args.workers or 1} worker(s):")
            print(format_schedule(cfg, args.workers or 1))
            return 0
        if args.cpus_per_worker <= 0:
            raise ConfigError("--cpus-per-worker must be positive.")
        name = _run_name(args)
        root = storage.check_storage_arg(args.storage)
        cfg = absolute_metric_files(cfg)
        check_dataset(args.data, cfg)
        args.data = storage.resolve(args.data)
        uri = resolve_tracking_uri(root, create=False)
        check_tracking(uri)
        run_dir = storage.join(root, name)
        if args.no_ray:
            return run_local(args, cfg, root, run_dir, uri)
        return run_ray(args, cfg, root, run_dir, uri)
    except (ConfigError, ckpt_mod.CheckpointError, storage.StorageError, TrackingError) as e:
        return fail(str(e))
    except RayConnectError as e:
        return fail(str(e))


def _mlflow_run(args, cfg: Config, root: str, run_dir: str, uri: str, previous_id: str | None, workers: int) -> str:
    if previous_id and run_exists(uri, previous_id):
        print(f"Continuing MLflow run {previous_id}.")
        RunLogger(uri, previous_id).client.update_run(previous_id, status="RUNNING")
        return previous_id
    if previous_id:
        print(f"note: MLflow run {previous_id} is not in {uri}; starting a new MLflow run for this run.")
    from .metrics.training import protocol_params  # how the metrics are measured: crop, mirror, reals, precision

    params = {**flat_params(cfg), **protocol_params(cfg), "data": storage.resolve(args.data),
              "workers": str(workers), "storage": root}
    run_id = create_run(uri, args.experiment, storage.name(run_dir), params, tags={"run_dir": run_dir},
                        storage_loc=root)
    return run_id


def _log_config(uri: str, run_id: str, run_dir: str, cfg: Config) -> None:
    path = storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))
    RunLogger(uri, run_id).log_artifact(path)


def run_ray(args: argparse.Namespace, cfg: Config, root: str, run_dir: str, uri: str) -> int:
    from .ray_train import CKPT_FILE, build_trainer, init_ray, latest_checkpoint_meta

    ray = init_ray()
    workers, use_gpu = _plan_workers(args, ray.cluster_resources())
    if args.restart and storage.exists(run_dir):
        print(f"--restart: moved the previous run to {_move_aside(run_dir)}")
    meta = latest_checkpoint_meta(run_dir)
    if meta is not None:
        if meta.get("config") is None:  # a checkpoint from before configs travelled in Ray's metadata
            meta["config"] = ckpt_mod.load_checkpoint(storage.join(meta["path"], CKPT_FILE))["config"]
        check_resume_compatible(cfg, meta["config"], run_dir)
        if from_dict(meta["config"]) != cfg:
            print("note: continuing with a changed config (schedule/loss/train keys differ from the checkpoint).")
        print(f"Continuing {run_dir} from kimg {meta['cur_nimg'] / 1000:.3f}.")
    if not storage.is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    run_id = _mlflow_run(args, cfg, root, run_dir, uri, meta and meta.get("mlflow_run_id"), workers)
    _log_config(uri, run_id, run_dir, cfg)

    kind = "GPU" if use_gpu else f"CPU ({args.cpus_per_worker:g} CPUs each)"
    print(f"Run {storage.name(run_dir)}: {workers} {kind} worker(s) ({args.placement}), global batch follows the "
          f"schedule x {workers}; {cfg.schedule.total_kimg:g} kimg to {cfg.model.resolution}x{cfg.model.resolution}")
    print(f"  storage: {run_dir}\n  MLflow:  run {run_id} in {uri}")
    trainer = build_trainer(
        to_dict(cfg), data=args.data, run_dir=run_dir, workers=workers, use_gpu=use_gpu,
        cpus_per_worker=args.cpus_per_worker, tracking_uri=uri, mlflow_run_id=run_id,
        max_failures=args.max_failures, keep_checkpoints=cfg.train.keep_checkpoints, max_ticks=args.max_ticks,
        pid_dir=os.environ.get("STYLEGAN_DIST_PID_DIR"), placement=args.placement,
    )
    logger = RunLogger(uri, run_id)
    t0 = time.time()
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        logger.terminate("KILLED")
        newest = latest_checkpoint_meta(run_dir)
        print(f"\nInterrupted. Newest checkpoint: {newest['path'] if newest else 'none yet'}; run the same "
              f"command to continue.", file=sys.stderr)
        return 130
    except Exception as e:  # TrainingFailedError after max_failures, with the workers' errors inside
        logger.terminate("FAILED")
        newest = latest_checkpoint_meta(run_dir)
        kept = f"newest checkpoint {newest['path']}" if newest else "no checkpoint was written"
        return fail(f"Training failed ({failure_message(e)}); {kept}.", code=1)

    newest = latest_checkpoint_meta(run_dir)
    finished = newest is not None and newest["cur_nimg"] >= int(round(cfg.schedule.total_kimg * 1000))
    if finished and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            logger.log_artifact(Path(d) / CKPT_FILE, "checkpoint")
    logger.terminate("FINISHED" if finished else "KILLED")  # KILLED: paused; the next run continues it
    _print_summary(run_dir, uri, run_id, newest, finished, time.time() - t0)
    return 0


def _print_summary(run_dir: str, uri: str, run_id: str, newest: dict | None, finished: bool, seconds: float) -> None:
    kimg = newest["cur_nimg"] / 1000 if newest else 0.0
    state = "finished" if finished else f"stopped at kimg {kimg:.3f} (run the same command to continue)"
    sample_dir = storage.join(run_dir, "samples")
    samples = [storage.join(sample_dir, n) for n in storage.list_dir(sample_dir) if n.startswith("grid-")]
    print(f"\nTraining {state} after {seconds:.1f}s.")
    print(f"  checkpoints: {newest['path'] if newest else 'none'} (newest)")
    print(f"  samples:     {samples[-1] if samples else 'none'}")
    print(f"  MLflow run:  {run_id}  ({uri})")
    from .run_tracking import MODEL_BEST_TAG, MODEL_URI_TAG

    tags = RunLogger(uri, run_id).client.get_run(run_id).data.tags
    if tags.get(MODEL_URI_TAG):
        best = tags.get(MODEL_BEST_TAG)
        also = f" (best FID: {best})" if best and best != tags[MODEL_URI_TAG] else ""
        print(f"  generator:   {tags[MODEL_URI_TAG]}{also}  (python -m stylegan_dist.generate --model URI ...)")
    print(f"  browse:      {run_url_hint(uri)}")


def run_local(args: argparse.Namespace, cfg: Config, root: str, run_dir: str, uri: str) -> int:
    import torch

    from data_pipeline.stream import DatasetError, LocalBatchSource

    from .loop import NonFiniteLossError, training_loop
    from .run_tracking import RunTracker, model_name_for

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device} was asked for but this machine has no usable CUDA device.")
    if args.restart and storage.exists(run_dir):
        print(f"--restart: moved the previous run to {_move_aside(run_dir)}")
    ckpt_dir = storage.join(run_dir, "checkpoints")
    latest = ckpt_mod.latest_checkpoint(ckpt_dir)
    resume = None
    if latest is not None:
        resume = ckpt_mod.load_checkpoint(latest, map_location=device)
        check_resume_compatible(cfg, resume["config"], run_dir)
    try:
        source = LocalBatchSource(args.data, seed=cfg.train.seed, mirror=cfg.train.mirror)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    if not storage.is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    run_id = _mlflow_run(args, cfg, root, run_dir, uri, resume and resume.get("extra", {}).get("mlflow_run_id"), 1)
    _log_config(uri, run_id, run_dir, cfg)
    logger = RunLogger(uri, run_id)
    tracker = RunTracker(uri, run_id, cfg, model_name_for(cfg, storage.name(run_dir)))

    print(f"Run {storage.name(run_dir)} in this process on {device}; MLflow run {run_id} in {uri}")
    t0 = time.time()
    try:
        result = training_loop(cfg, source, run_dir, device=device, resume=resume,
                               report=lambda stats, _path: tracker.tick(stats),
                               extra_state={"mlflow_run_id": run_id}, stop_after_ticks=args.max_ticks,
                               metrics_data=args.data, on_generator=tracker.generator)
    except NonFiniteLossError as e:
        logger.terminate("FAILED")
        return fail(str(e), code=1)
    except KeyboardInterrupt:
        logger.terminate("KILLED")
        print(f"\nInterrupted. Newest checkpoint: {ckpt_mod.latest_checkpoint(ckpt_dir) or 'none yet'}; run the "
              f"same command to continue.", file=sys.stderr)
        return 130
    finally:
        tracker.close()
    if result.finished and result.checkpoint is not None:
        logger.log_artifact(result.checkpoint, "checkpoint")
    logger.terminate("FINISHED" if result.finished else "KILLED")
    newest = {"path": str(result.checkpoint), "cur_nimg": result.cur_nimg} if result.checkpoint else None
    _print_summary(run_dir, uri, run_id, newest, result.finished, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
