"""``python -m stylegan_dist.sweep``: run a sweep file (an ablation of the paper, or any search) with Ray Tune.

Each trial is one Ray Train run (the trial is a function that builds the ``TorchTrainer`` and relays its
workers' per-tick reports to Tune), logs to its own MLflow run inside the sweep's experiment and parent
run, and at the end is evaluated with the metrics the sweep names. The comparison table
(``python -m stylegan_dist.compare``) is printed and logged when the sweep ends.

A sweep lives in STORAGE/NAME (a directory or an object-storage URI such as s3://bucket/sweeps):
sweep.json (what was started, the parent MLflow run), tune/ (Ray Tune's experiment state), trials/KEY/
(each trial's Ray Train run: checkpoints, samples, its MLflow run id, result.json once evaluated) and
report/. KEY is derived from the trial's values, so running the same command again continues the sweep:
finished trials are kept, unfinished ones resume from their newest checkpoint. --restart moves the old sweep
aside and starts over.

Examples:
  python -m data_pipeline.synthetic data/shapes16 --num-images 256 --resolution 16
  python -m stylegan_dist.sweep sweeps/smoke.yaml --data data/shapes16 --storage runs
  python -m stylegan_dist.sweep sweeps/table2_mixing.yaml --data s3://bucket/ffhq1024 --storage s3://bucket/sweeps
  python -m stylegan_dist.sweep sweeps/table4_mapping_depth.yaml --dry-run      # list the trials and exit
  ray job submit --working-dir . -- python -m stylegan_dist.sweep sweeps/table1_configs.yaml --data s3://bucket/ffhq
      (on a cluster whose nodes set STYLEGAN_DIST_STORAGE=s3://bucket/sweeps and MLFLOW_TRACKING_URI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import Any

from . import storage
from .cli import fail
from .config import ConfigError, flat_params, to_dict, to_yaml
from .ray_train import RayConnectError
from .sweep_schema import (
    Evaluate,
    SweepError,
    SweepSpec,
    TrialPoint,
    load_sweep,
    sample_value,
)
from .tracking import TrackingError

STATE_FILE = "sweep.json"
RESULT_FILE = "result.json"
RUN_ID_FILE = "mlflow_run_id"
TUNE_NAME = "tune"
TRIAL_DRIVER_CPUS = 0.25  # what a trial's own actor reserves (its workers reserve theirs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file (see sweeps/README.md)")
    ap.add_argument("--data", metavar="DIR|URI", help="dataset (a directory or a URI) made by "
                    "data_pipeline.prepare or data_pipeline.synthetic (required unless the sweep file sets data:)")
    ap.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set_args",
                    help="a config key for every trial (--set schedule.total_kimg=100) or a sweep key "
                    "(--set resources.workers=4, --set evaluate.metrics=[fid50k], --set num_samples=2, "
                    "--set search.generator.mixing_prob=[0,0.9]); repeatable, values are YAML")
    ap.add_argument("--storage", metavar="DIR|URI", help="where sweeps are stored: a directory, or on a multi-node "
                    "cluster an absolute shared path or an object-storage URI (s3://bucket/sweeps). Default: the "
                    f"file's storage:, else ${storage.STORAGE_ENV}, else ./runs")
    ap.add_argument("--name", metavar="NAME", help="sweep name: its directory under --storage and its MLflow "
                    "experiment (default: the file's name:, else the file name)")
    ap.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the sweep name)")
    ap.add_argument("--restart", action="store_true", help="move an existing sweep of this name aside "
                    "(NAME.old-TIMESTAMP) and start over")
    ap.add_argument("--dry-run", action="store_true", help="print the trials and their configs, then exit "
                    "(no Ray, no data needed)")
    ap.add_argument("--no-report", action="store_true", help="skip the comparison report at the end")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Tune search space <-> trial points


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param space: 'variant' over the named trials, one entry per search key, 'repeat' for repeats
    of a grid. Values that are not scalars (dicts, lists) are passed by index."""
    from ray import tune

    space: dict[str, Any] = {}
    if spec.variants:
        space["variant"] = tune.grid_search([v.name for v in spec.variants])
    for d in spec.search:
        vals = list(d.values) if all(_scalar(v) for v in d.values) else list(range(len(d.values)))
        if d.kind == "grid":
            space[d.key] = tune.grid_search(vals)
        elif d.kind == "choice":
            space[d.key] = tune.choice(vals)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:
            space[d.key] = tune.randint(*d.values)
    if spec.num_samples > 1 and not spec.sampled:
        space["repeat"] = tune.grid_search(list(range(spec.num_samples)))
    return space


def point_from_config(spec: SweepSpec, config: dict[str, Any]) -> TrialPoint:
    values = {}
    for d in spec.search:
        v = config[d.key]
        if d.kind in ("grid", "choice") and not all(_scalar(x) for x in d.values):
            v = d.values[int(v)]
        values[d.key] = v
    return TrialPoint(config.get("variant"), values, int(config.get("repeat", 0)))


# --------------------------------------------------------------------------------------------------
# Small file helpers


def _write_json(path: str, obj: Any) -> None:
    storage.write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError):
        return None


def _write_text(path: str, text: str) -> None:
    storage.write_text(path, text)


# --------------------------------------------------------------------------------------------------
# Evaluation (runs as a Ray task on the trial's kind of device once training has finished)


def evaluate_checkpoint(checkpoint: str, data: str, names: list[str], *, num: int | None = None, batch: int = 32,
                        seed: int = 0, weights: dict[str, str] | None = None, ppl_crop: bool = True,
                        cache_dir: str | None = None, device: str = "auto", threads: int | None = None
                        ) -> dict[str, float]:
    """The paper's metrics for a checkpoint's G_ema at its current resolution -> {'fid50k': ..., 'ls_z': ...}.

    Sample counts default to the paper's (50k FID, 100k PPL, 200k LS). Weight files come from ``weights``
    (inception, vgg16, lpips, classifier), else from the STYLEGAN_* environment variables; a missing one
    raises MetricError naming the file."""
    import torch

    from .generate import load_generator, resolve_device
    from .metrics import calc_metric
    from .metrics.training import MetricsSettings, options_from_settings

    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    G, run_cfg, info = load_generator(checkpoint, dev)
    w = weights or {}
    settings = MetricsSettings(num=num or 0, batch_size=batch, seed=seed, inception_weights=w.get("inception", ""),
                               vgg16_weights=w.get("vgg16", ""), lpips_weights=w.get("lpips", ""),
                               classifier=w.get("classifier", ""), ppl_crop=ppl_crop, cache_dir=cache_dir or "")
    opts = options_from_settings(settings, G, resolution=info["resolution"], alpha=info["alpha"], data=data,
                                 device=dev, mirror=run_cfg.train.mirror)
    out: dict[str, float] = {}
    for name in names:
        out.update(calc_metric(name, opts)["results"])
    return out


def resolve_weights(spec: SweepSpec) -> dict[str, str]:
    """Locations (absolute paths or storage URIs) of the weight files the sweep's metrics need, checked now (on
    the driver), so a missing file fails before hours of training. The locations travel to the trials explicitly:
    Ray workers do not see the driver's environment variables; a URI is copied locally by each node."""
    from .metrics.registry import MetricError, extractors_needed
    from .metrics.weights import locate_weight

    files = {"inception": {"inception"}, "lpips": {"vgg16", "lpips"}, "classifier": {"classifier"}}
    needed = set()
    for extractor in extractors_needed(sorted(set(spec.evaluate.metrics) | spec.training_metrics())):
        needed |= files[extractor]  # the registry's own list: fid_shapes reads the classifier, not Inception
    out = {}
    for key in sorted(needed):
        try:
            out[key] = locate_weight(key, spec.evaluate.weights.get(key))
        except MetricError as e:
            names = sorted(set(spec.evaluate.metrics) | spec.training_metrics())
            raise SweepError(f"The sweep evaluates {', '.join(names)}, but {_lower(str(e))} "
                             f"(or set evaluate.weights.{key} in the sweep file; evaluate.metrics: [] skips "
                             f"evaluation).") from None
    return out


def _with_metric_files(cfg, weights: dict[str, str], cache_dir: str | None):
    """The trial's config with the driver's resolved weight files filled into its training-time metrics
    settings (Ray workers do not see the driver's environment)."""
    import dataclasses

    section = getattr(cfg, "metrics", None)
    if section is None or not getattr(section, "names", ""):
        return cfg
    fill = {"inception_weights": weights.get("inception"), "vgg16_weights": weights.get("vgg16"),
            "lpips_weights": weights.get("lpips"), "classifier": weights.get("classifier"), "cache_dir": cache_dir}
    fill = {k: v for k, v in fill.items() if v and hasattr(section, k) and not getattr(section, k)}
    return dataclasses.replace(cfg, metrics=dataclasses.replace(section, **fill)) if fill else cfg


def _lower(s: str) -> str:
    return s[:1].lower() + s[1:]


# --------------------------------------------------------------------------------------------------
# One trial (runs inside a Ray Tune trial actor)


def _paper_row(spec: SweepSpec, point: TrialPoint, params: dict[str, str], tags: dict[str, str]
               ) -> tuple[str | None, str]:
    """(row key, the paper's row label) of a trial in the sweep's paper table: the variant's ``paper_row``, else
    the row its parameters select (Table 2's mixing ratio, ...), as ``compare`` places it. Tagged on the trial's
    run, so the MLflow UI can group and label trials by paper row."""
    row = spec.paper_row(point)
    if not spec.paper_table:
        return row, ""
    from .compare import PAPER_TABLES

    table = PAPER_TABLES[spec.paper_table]
    row = row or table.row_key(params, tags)
    return row, (table.rows[row][0] if row in table.rows else "")


def _trial_run_id(ctx: dict, spec: SweepSpec, point: TrialPoint, cfg, tdir: str, index: int | None) -> str:
    from .ray_train import latest_checkpoint_meta
    from .tracking import RunLogger, create_run, run_exists

    uri = ctx["uri"]
    candidates = []
    meta = latest_checkpoint_meta(tdir)
    if meta and meta.get("mlflow_run_id"):
        candidates.append(meta["mlflow_run_id"])
    if storage.is_file(storage.join(tdir, RUN_ID_FILE)):
        candidates.append(storage.read_text(storage.join(tdir, RUN_ID_FILE)).strip())
    for run_id in candidates:
        if run_id and run_exists(uri, run_id):
            logger = RunLogger(uri, run_id)
            logger.client.update_run(run_id, status="RUNNING")
            logger.set_tag("sweep.status", "running")
            return run_id
    preset, _ = spec.trial_overrides(point)
    from .metrics.training import protocol_params

    params = {**flat_params(cfg), **protocol_params(cfg), "data": ctx["data"], "workers": str(ctx["workers"]),
              "gpu": str(ctx["use_gpu"]), "sweep.trial": spec.label(point)}
    tags = {"mlflow.parentRunId": ctx["parent_run_id"], "sweep.role": "trial", "sweep.name": spec.name,
            "sweep.variant": point.variant or "", "sweep.preset": preset or ""}
    row, row_label = _paper_row(spec, point, params, tags)
    tags = {**tags, "sweep.paper_row": row or "", "paper.row": row_label,
            "sweep.values": json.dumps(point.values, default=str),
            "sweep.status": "running", "sweep.index": str(index if index is not None else ""),
            "run_dir": tdir}
    run_id = create_run(uri, ctx["experiment"], spec.label(point), params, tags={k: v for k, v in tags.items() if v})
    _write_text(storage.join(tdir, RUN_ID_FILE), run_id + "\n")
    _write_text(storage.join(tdir, "config.yaml"), to_yaml(cfg))
    RunLogger(uri, run_id).log_artifact(storage.join(tdir, "config.yaml"))
    return run_id


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: train one configuration with Ray Train, then evaluate it."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .ray_train import CKPT_FILE, build_trainer, latest_checkpoint_meta
    from .tracking import RunLogger

    spec: SweepSpec = ctx["spec"]
    point = point_from_config(spec, config)
    trial_id = tune.get_context().get_trial_id()
    key = spec.trial_key(point, trial_id)
    tdir = storage.join(ctx["trials_dir"], key)
    storage.makedirs(tdir)
    done = _read_json(storage.join(tdir, RESULT_FILE))
    if done is not None and done.get("status") == "finished":  # finished in an earlier invocation
        tune.report({**done["metrics"], "kimg": done["kimg"], "trial_key": key, "finished": 1})
        return
    cfg = _with_metric_files(spec.trial_config(point), ctx["weights"], spec.evaluate.cache_dir)
    index = next((i for i, p in enumerate(spec.grid_points()) if p == point), None) if not spec.sampled else None
    uri = ctx["uri"]
    run_id = _trial_run_id(ctx, spec, point, cfg, tdir, index)
    logger = RunLogger(uri, run_id)
    keep = spec.keep_checkpoints or cfg.train.keep_checkpoints
    trainer = build_trainer(
        to_dict(cfg), data=ctx["data"], run_dir=tdir, workers=ctx["workers"], use_gpu=ctx["use_gpu"],
        cpus_per_worker=ctx["cpus_per_worker"], tracking_uri=uri, mlflow_run_id=run_id,
        max_failures=spec.max_failures, keep_checkpoints=keep, callbacks=[TuneReportCallback()],
        model_name=spec.name,
    )
    t0 = time.time()
    # An exception here is a failed trial or a sweep being interrupted (Ctrl-C stops the trainer mid-fit); which of
    # the two only the driver knows, so the driver's _finish sets the MLflow status and tag of every unfinished
    # trial (writing FAILED here raced with its KILLED).
    fit_result = trainer.fit()
    train_seconds = time.time() - t0
    newest = latest_checkpoint_meta(tdir)
    total = int(round(cfg.schedule.total_kimg * 1000))
    if newest is None or newest["cur_nimg"] < total:
        logger.terminate("FAILED")
        raise RuntimeError(f"Trial {spec.label(point)} stopped at kimg "
                           f"{(newest or {}).get('cur_nimg', 0) / 1000:.3f} before the end of its schedule.")
    checkpoint = storage.join(newest["path"], CKPT_FILE)
    # Metrics the training loop already computed at the final tick with the same settings (sample count; the
    # face crop for PPL) need not be computed again.
    last = (fit_result.metrics or {}) if fit_result is not None else {}
    section = getattr(cfg, "metrics", None)
    reusable = []
    if section is not None and last.get("cur_nimg") == newest["cur_nimg"] and \
            (section.num or None) == spec.evaluate.num:
        reusable = [m for m in spec.evaluate.metrics
                    if (not m.startswith("ppl") or bool(section.ppl_crop) == spec.evaluate.ppl_crop)
                    and all(isinstance(last.get(o), (int, float)) for o in Evaluate(metrics=(m,)).outputs())]
    metrics = {o: float(last[o]) for o in Evaluate(metrics=tuple(reusable)).outputs()}
    pending = [m for m in spec.evaluate.metrics if m not in reusable]
    eval_seconds = 0.0
    if pending:
        ev = spec.evaluate
        logger.set_tag("sweep.status", "evaluating")
        t1 = time.time()
        # Outside the trial's placement group (which holds only the trial actor's sliver of a CPU): the
        # training workers have been released, so their CPUs/GPU are free for the evaluation.
        task = ray.remote(evaluate_checkpoint).options(
            num_cpus=ctx["cpus_per_worker"], num_gpus=1 if ctx["use_gpu"] else 0, max_retries=0,
            scheduling_strategy="DEFAULT")
        try:
            metrics.update(ray.get(task.remote(
                checkpoint, ctx["data"], pending, num=ev.num, batch=ev.batch, seed=ev.seed, weights=ctx["weights"],
                ppl_crop=ev.ppl_crop, cache_dir=ev.cache_dir, device="cuda" if ctx["use_gpu"] else "cpu",
                threads=max(1, int(ctx["cpus_per_worker"])))))
        except Exception:
            logger.set_tag("sweep.status", "failed")
            logger.terminate("FAILED")
            raise
        eval_seconds = time.time() - t1
        logger.log_metrics({**{k: metrics[k] for k in Evaluate(metrics=tuple(pending)).outputs()},
                            "eval_seconds": eval_seconds}, step=newest["cur_nimg"])
    result = {"status": "finished", "label": spec.label(point), "key": key, "mlflow_run_id": run_id,
              "kimg": newest["cur_nimg"] / 1000, "cur_nimg": newest["cur_nimg"], "metrics": metrics,
              "checkpoint": checkpoint, "train_seconds_this_call": train_seconds, "eval_seconds": eval_seconds,
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write_json(storage.join(tdir, RESULT_FILE), result)
    logger.set_tag("sweep.status", "finished")
    logger.set_tag("checkpoint", checkpoint)
    logger.terminate("FINISHED")
    tune.report({**metrics, "kimg": result["kimg"], "trial_key": key, "finished": 1})


# --------------------------------------------------------------------------------------------------
# The driver


def plan_resources(spec: SweepSpec, cluster: dict[str, float]) -> tuple[bool, int]:
    """(use GPUs, trials run at once) for the cluster's resources; a trial that cannot fit is an error."""
    r = spec.resources
    gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    use_gpu = r.gpu is True or (r.gpu == "auto" and gpus > 0)
    if r.gpu is True and gpus == 0:
        raise SweepError("The sweep asks for GPU workers (resources.gpu: true) but the Ray cluster has no GPUs; "
                         "use --set resources.gpu=false to train on CPU workers.")
    if use_gpu and r.workers > gpus:
        raise SweepError(f"Each trial needs {r.workers} GPU workers but the Ray cluster has {gpus} GPUs; lower "
                         f"--set resources.workers={gpus} (the per-GPU batch comes from the config) or add GPU nodes.")
    need_cpu = r.workers * r.cpus_per_worker + TRIAL_DRIVER_CPUS
    if need_cpu > cpus:
        raise SweepError(f"Each trial needs {r.workers} workers x {r.cpus_per_worker:g} CPUs but the Ray cluster has "
                         f"{cpus:g} CPUs; lower resources.workers or resources.cpus_per_worker.")
    fit = math.floor(cpus / need_cpu)
    if use_gpu:
        fit = min(fit, gpus // r.workers)
    concurrency = min(spec.max_concurrent_trials or fit, spec.num_trials())
    return use_gpu, max(1, concurrency)


def _check_data(spec: SweepSpec, data: str | None) -> str:
    from .train import check_dataset

    if not data:
        raise SweepError(f"No dataset: pass --data DIR (or set data: in {spec.path}); make one with "
                         f"python -m data_pipeline.prepare or python -m data_pipeline.synthetic.")
    seen = set()
    for p in spec.grid_points():
        try:
            cfg = spec.trial_config(p)
        except ConfigError:
            continue  # sampled values: checked at load time at their bounds
        k = (cfg.schedule.start_resolution, cfg.model.resolution)
        if k not in seen:
            seen.add(k)
            check_dataset(data, cfg)
    return storage.resolve(data)


def _parent_run(spec: SweepSpec, uri: str, experiment: str, sweep_dir: str, state: dict | None,
                use_gpu: bool, concurrency: int) -> str:
    from .tracking import RunLogger, create_run, log_params, run_exists

    if state and state.get("parent_run_id") and run_exists(uri, state["parent_run_id"]):
        run_id = state["parent_run_id"]
        RunLogger(uri, run_id).client.update_run(run_id, status="RUNNING")
        return run_id
    params = {"sweep.file": spec.path, "sweep.trials": str(spec.num_trials()),
              "sweep.num_samples": str(spec.num_samples),
              "sweep.search": "; ".join(d.describe() for d in spec.search) or "-",
              "sweep.variants": ", ".join(v.name for v in spec.variants) or "-",
              "sweep.base_preset": spec.base_preset or "-",
              "sweep.metrics": ",".join(spec.evaluate.metrics) or "-",
              "sweep.objective": spec.objective_metric or "-",
              "resources.workers": str(spec.resources.workers), "resources.gpu": str(use_gpu),
              "resources.cpus_per_worker": str(spec.resources.cpus_per_worker),
              "max_concurrent_trials": str(concurrency)}
    params.update({f"base.{k}": str(v) for k, v in {**spec.base_overrides, **spec.set_overrides}.items()})
    swept = [d.key for d in spec.search]
    tags = {"sweep.role": "parent", "sweep.name": spec.name, "sweep.dir": sweep_dir,
            "sweep.swept": json.dumps(swept), "sweep.paper_table": spec.paper_table or "",
            "sweep.description": spec.description[:4000],
            "sweep.objective": f"{spec.objective_metric}:{spec.objective_mode}" if spec.objective_metric else ""}
    run_id = create_run(uri, experiment, spec.name, {}, tags={k: v for k, v in tags.items() if v})
    log_params(uri, run_id, params)
    return run_id


def _trial_table(spec: SweepSpec, trials_dir: str) -> list[str]:
    from .ray_train import latest_checkpoint_meta

    lines = []
    if spec.sampled:
        return [f"    {spec.num_trials()} trials sampled from: " + "; ".join(d.describe() for d in spec.search)]
    width = max(len(spec.label(p)) for p in spec.grid_points())
    for p in spec.grid_points():
        tdir = storage.join(trials_dir, spec.trial_key(p))
        res = _read_json(storage.join(tdir, RESULT_FILE))
        meta = latest_checkpoint_meta(tdir)
        if res and res.get("status") == "finished":
            state = f"finished at kimg {res['kimg']:g} (kept)"
        elif meta:
            state = f"continues from kimg {meta['cur_nimg'] / 1000:g}"
        else:
            state = "new"
        lines.append(f"    {spec.label(p):<{width}}  {state:<32} {storage.name(tdir)}")
    return lines


def _describe_trials(spec: SweepSpec) -> str:
    """The config every trial shares (where it differs from the paper's defaults), then each trial's own keys."""
    import numpy as np

    from .config import Config, resolve

    rng = np.random.default_rng(spec.seed)
    trials = []
    for p in spec.grid_points():
        values = {d.key: sample_value(d, rng) if d.sampled else p.values[d.key] for d in spec.search}
        pt = TrialPoint(p.variant, values, p.repeat)
        trials.append((pt, flat_params(spec.trial_config(pt))))
    defaults = flat_params(resolve(Config()))
    common = {k: v for k, v in trials[0][1].items() if all(t[1][k] == v for t in trials)}
    out = ["  every trial (differences from the paper's defaults):"]
    out += [f"      {k} = {v}" for k, v in common.items() if defaults.get(k) != v] or ["      (none)"]
    for pt, params in trials:
        preset, _ = spec.trial_overrides(pt)
        out.append(f"  {spec.label(pt)}" + (f"  [preset {preset}]" if preset else "")
                   + ("" if spec.sampled else f"  -> trials/{spec.trial_key(pt)}"))
        out += [f"      {k} = {v}" for k, v in params.items() if k not in common]
    if spec.sampled:
        out.append(f"  (sampled values are examples; {spec.num_trials()} trials are sampled in all)")
    return "\n".join(out)


def _move_aside(path: str) -> str:
    target = storage.join(storage.parent(path), f"{storage.name(path)}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    return storage.move(path, target)


def _fingerprint(spec: SweepSpec, data: str) -> dict:
    return json.loads(json.dumps({**spec.fingerprint(), "data": data}, default=str))


def _make_scheduler(spec: SweepSpec, base_total_kimg: float):
    if spec.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = spec.scheduler
    # Trials report only some of their ticks with the metric (e.g. FID every N kimg); the others must not
    # trip Tune's check that every result carries the scheduler's metric.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    return ASHAScheduler(time_attr=s.time_attr, metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, max_t=s.max_t or base_total_kimg)


def run(args: argparse.Namespace, spec: SweepSpec) -> int:
    from ray import tune

    from .ray_train import init_ray
    from .tracking import RunLogger, check_tracking, ensure_experiment, resolve_tracking_uri

    root = storage.check_storage_arg(args.storage or spec.storage)
    data = _check_data(spec, args.data or spec.data)
    weights = resolve_weights(spec)
    sweep_dir = storage.join(root, spec.name)
    experiment = args.experiment or spec.name
    fingerprint = _fingerprint(spec, data)
    uri = resolve_tracking_uri(root, create=False)
    check_tracking(uri)

    ray = init_ray()
    use_gpu, concurrency = plan_resources(spec, ray.cluster_resources())
    if args.restart and storage.exists(sweep_dir):
        print(f"--restart: moved the previous sweep to {_move_aside(sweep_dir)}")
    state = _read_json(storage.join(sweep_dir, STATE_FILE))
    if state is not None and state.get("fingerprint") != fingerprint:
        raise SweepError(f"The sweep in {sweep_dir} was started with other trials, configs or data; run with "
                         f"--restart to start over, or --name NEW for a separate sweep.")
    trials_dir = storage.join(sweep_dir, "trials")
    storage.makedirs(trials_dir)
    uri = resolve_tracking_uri(root)
    ensure_experiment(uri, experiment, root)
    parent_id = _parent_run(spec, uri, experiment, sweep_dir, state, use_gpu, concurrency)
    if state is None:
        _write_json(storage.join(sweep_dir, STATE_FILE), {
            "name": spec.name, "file": spec.path, "experiment": experiment, "parent_run_id": parent_id,
            "fingerprint": fingerprint, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        parent = RunLogger(uri, parent_id)
        parent.log_artifact(spec.path, "sweep")

    kind = "GPU worker(s)" if use_gpu else f"CPU worker(s) ({spec.resources.cpus_per_worker:g} CPUs each)"
    print(f"Sweep {spec.name} ({spec.path}): {spec.num_trials()} trials, {concurrency} at a time, "
          f"{spec.resources.workers} {kind} per trial")
    print(f"  storage: {sweep_dir}\n  MLflow:  experiment '{experiment}', sweep run {parent_id} in {uri}")
    if spec.evaluate.metrics:
        print(f"  evaluates: {', '.join(spec.evaluate.metrics)} "
              f"({spec.evaluate.num or 'paper'} samples) on each trial's final checkpoint")
    print("  trials:")
    print("\n".join(_trial_table(spec, trials_dir)))

    ctx = {"spec": spec, "data": data, "trials_dir": trials_dir, "uri": uri, "experiment": experiment,
           "parent_run_id": parent_id, "use_gpu": use_gpu, "workers": spec.resources.workers,
           "cpus_per_worker": spec.resources.cpus_per_worker, "weights": weights}
    # The trial actor only drives the trainer and logs; its Ray Train workers and the evaluation task
    # reserve their own CPUs/GPUs, so the trial itself reserves a sliver of a CPU.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": TRIAL_DRIVER_CPUS})
    tune_path = storage.join(sweep_dir, TUNE_NAME)
    tune_fs, tune_fs_path = _tune_fs(tune_path)
    first = spec.grid_points()[0]
    example = TrialPoint(first.variant, {d.key: d.values[0] if d.sampled else first.values[d.key]
                                         for d in spec.search}, 0)
    base_total = spec.trial_config(example).schedule.total_kimg
    run_config = tune.RunConfig(name=TUNE_NAME, storage_path=_tune_fs(sweep_dir)[1], storage_filesystem=tune_fs,
                                failure_config=tune.FailureConfig(max_failures=spec.retries), verbose=1)
    tune_config = tune.TuneConfig(
        num_samples=spec.num_samples if spec.sampled else 1,
        scheduler=_make_scheduler(spec, base_total),
        # The generator limits concurrency itself (with a search_alg given, Tune ignores max_concurrent_trials).
        search_alg=tune.search.BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency),
        trial_name_creator=lambda t: f"{t.trial_id}", trial_dirname_creator=lambda t: f"{t.trial_id}",
    )
    if tune.Tuner.can_restore(tune_fs_path, storage_filesystem=tune_fs):
        print(f"Continuing the Tune experiment in {tune_path}.")
        tuner = tune.Tuner.restore(tune_fs_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, restart_errored=False, storage_filesystem=tune_fs)
    else:
        if storage.exists(tune_path):  # interrupted before Tune saved its state: trial dirs still hold the progress
            _move_aside(tune_path)
        tuner = tune.Tuner(trainable, param_space=param_space(spec), tune_config=tune_config, run_config=run_config)
    # `ray job stop` sends SIGTERM: turn it into Ctrl-C so Tune stops the trials and saves its state.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.time()
    tuner.fit()
    return _finish(spec, args, sweep_dir, trials_dir, uri, experiment, parent_id, time.time() - t0)


def _tune_fs(loc: str):
    """(filesystem or None for local paths, path) for Ray Tune's storage arguments."""
    fs, path = storage.filesystem(loc)
    return (fs if storage.is_uri(loc) else None), path


def _finish(spec, args, sweep_dir: str, trials_dir: str, uri: str, experiment: str, parent_id: str,
            seconds: float) -> int:
    from ray.tune import ExperimentAnalysis

    from .tracking import RunLogger, run_exists

    finished, failed, stopped, interrupted = [], [], [], []
    # Tune's saved experiment state tells finished (TERMINATED: returned, or stopped by the scheduler), failed
    # (ERROR) and interrupted (anything else) trials apart.
    tune_fs, tune_path = _tune_fs(storage.join(sweep_dir, TUNE_NAME))
    for trial in ExperimentAnalysis(tune_path, storage_filesystem=tune_fs).trials:
        point = point_from_config(spec, trial.config)
        tdir = storage.join(trials_dir, spec.trial_key(point, trial.trial_id))
        res = _read_json(storage.join(tdir, RESULT_FILE))
        label = spec.label(point)
        if res and res.get("status") == "finished":
            finished.append(label)
            continue
        run_id_file = storage.join(tdir, RUN_ID_FILE)
        run_id = storage.read_text(run_id_file).strip() if storage.is_file(run_id_file) else None
        if trial.status == "ERROR":
            failed.append(f"{label}: {_error_line(storage.join(sweep_dir, TUNE_NAME, trial.trial_id))}")
            status, mlflow_status = "failed", "FAILED"
        elif trial.status == "TERMINATED":
            stopped.append(label)
            status, mlflow_status = "stopped early", "FINISHED"
        else:
            interrupted.append(label)
            status, mlflow_status = "interrupted", "KILLED"
        if run_id and run_exists(uri, run_id):
            logger = RunLogger(uri, run_id)
            logger.set_tag("sweep.status", status)
            logger.terminate(mlflow_status)
    parent = RunLogger(uri, parent_id)
    print(f"\nSweep {spec.name}: {len(finished)} finished, {len(stopped)} stopped early, {len(failed)} failed, "
          f"{len(interrupted)} unfinished ({seconds:.0f} s this run).")
    for line in failed:
        print(f"  failed: {line}")
    if not args.no_report:
        from .compare import CompareError, report

        try:
            report(uri, experiment, storage.join(sweep_dir, "report"), parent_id=parent_id)
        except CompareError as e:
            print(f"note: no comparison yet ({e})")
    if interrupted:
        parent.terminate("KILLED")
        print(f"Interrupted: run the same command to continue ({len(interrupted)} trial(s) resume from their "
              f"checkpoints, finished ones are kept).", file=sys.stderr)
        return 130
    if failed:
        parent.terminate("FAILED")
        return fail(f"{len(failed)} trial(s) failed (listed above; tracebacks in "
                    f"{storage.join(sweep_dir, TUNE_NAME)}/*/error.txt); "
                    f"run the same command to retry them from their checkpoints.", code=1)
    parent.terminate("FINISHED")
    return 0


def _error_line(trial_dir: str) -> str:
    """The last line of a failed trial's traceback (Tune writes it to error.txt)."""
    try:
        lines = [line for line in storage.read_text(storage.join(trial_dir, "error.txt")).splitlines()
                 if line.strip()]
    except OSError:
        return "see Tune's log"
    return lines[-1].strip()[:300] if lines else "see Tune's log"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_sweep(args.sweep, args.set_args)
        if args.name:
            from dataclasses import replace

            spec = replace(spec, name=args.name)
        if args.dry_run:
            print(f"Sweep {spec.name} ({spec.path}): {spec.num_trials()} trials; "
                  f"{spec.resources.workers} worker(s) per trial (gpu: {spec.resources.gpu}); evaluates "
                  f"{', '.join(spec.evaluate.metrics) or 'nothing'}" +
                  (f"; paper table {spec.paper_table}" if spec.paper_table else ""))
            print(_describe_trials(spec))
            return 0
        return run(args, spec)
    except (SweepError, ConfigError, storage.StorageError, TrackingError, RayConnectError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("\nInterrupted; run the same command to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
