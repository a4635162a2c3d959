"""``python -m stylegan_dist.evaluate``: the paper's metrics for a checkpoint's G_ema, logged to MLflow.

Metrics (see docs/metrics.md): fid50k, fid50k_mix2..4 (Table 2); ppl_zfull, ppl_wfull, ppl_zend, ppl_wend;
ls (reports ls_z and ls_w); fid_shapes (FID in the shapes classifier's feature space). A partially grown
checkpoint is evaluated at its current resolution. Pretrained weights are read from local files (options
below, or STYLEGAN_INCEPTION_WEIGHTS, STYLEGAN_VGG16_WEIGHTS, STYLEGAN_LPIPS_WEIGHTS, STYLEGAN_CLASSIFIER, or
STYLEGAN_WEIGHTS_DIR); nothing is downloaded.

Values go to the MLflow run given by --mlflow-run, else to the run recorded in the checkpoint (if any),
at step = the checkpoint's image count; the tracking store is MLFLOW_TRACKING_URI, else the
mlflow.db that training wrote beside the run (STORAGE/mlflow.db), else ./mlflow.db.

Examples:
  python -m stylegan_dist.evaluate --checkpoint CKPT --data data/shapes64 --metrics fid50k --num 10000
  python -m stylegan_dist.evaluate --checkpoint CKPT --data DIR --metrics fid50k,ppl_wend,ls --mlflow-run RUN_ID
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .cli import fail
from .config import ConfigError
from .generate import GenerateError, add_generator_source, load_generator, resolve_device
from .metrics import MetricError, calc_metric, list_metrics, parse_metric_list
from .metrics.fid import get_inception
from .metrics.ppl import get_lpips
from .metrics.registry import extractors_needed
from .metrics.separability import get_classifier
from .metrics.training import options_from_settings, settings_from_config

DEFAULT_NUM = {"fid": 50_000, "ppl": 100_000, "ls": 200_000}  # by the metric name's prefix


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_source(ap, required=False)
    ap.add_argument("--data", metavar="DIR", help="prepared dataset of real images (needed by fid50k)")
    ap.add_argument("--metrics", default="fid50k", help="comma-separated metric names (default: fid50k); "
                    "--list shows them")
    ap.add_argument("--num", type=int, metavar="N", help="samples per metric (default: the paper's, 50k FID, "
                    "100k PPL, 200k LS)")
    ap.add_argument("--batch", type=int, default=32, help="images per forward pass (default: 32)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ap.add_argument("--workers", type=int, metavar="N", help="Ray workers sharing the samples (default: one per GPU "
                    "in the Ray cluster, else 1 CPU worker); the value does not depend on N")
    ap.add_argument("--gpu", action="store_true", help="GPU workers (an error if the Ray cluster has none)")
    ap.add_argument("--cpu", action="store_true", help="CPU workers even when the cluster has GPUs")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs (and torch threads) "
                    "per worker (default: 1)")
    ap.add_argument("--storage", metavar="DIR|URI", help="Ray Train's working storage, which every node must reach "
                    "(a directory or a URI; default: $STYLEGAN_DIST_STORAGE, else a temporary directory here, enough "
                    "for a one-node cluster)")
    ap.add_argument("--no-ray", action="store_true", help="evaluate in this process, without Ray")
    ap.add_argument("--device", default="auto", help="with --no-ray: auto (CUDA when available), cpu, cuda or "
                    "cuda:N")
    ap.add_argument("--inception", metavar="FILE", help="FID Inception weights, pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth")
    ap.add_argument("--vgg16", metavar="FILE", help="VGG16 weights in torchvision's format (vgg16-397923af.pth)")
    ap.add_argument("--lpips", metavar="FILE", help="LPIPS v0.1 linear weights (the lpips package's vgg.pth)")
    ap.add_argument("--classifier", metavar="FILE", help="attribute classifier for ls (made by python -m "
                    "stylegan_dist.metrics.classifier, or a torch.export archive)")
    ap.add_argument("--cache-dir", metavar="DIR", help="real-statistics cache (default: $STYLEGAN_CACHE_DIR or "
                    "~/.cache/stylegan_dist)")
    ap.add_argument("--ppl-crop", action=argparse.BooleanOptionalAction, default=None,
                    help="crop the central face region before LPIPS (default: the run's metrics.ppl_crop, on as in "
                    "StyleGAN v1; --no-ppl-crop for data that are not faces)")
    ap.add_argument("--fid-mirror", action=argparse.BooleanOptionalAction, default=None,
                    help="mirror FID's reals at random (default: when the run used mirror augmentation, as the "
                    "official metric)")
    ap.add_argument("--ls-min-accuracy", type=float, help="ls uses only attributes whose classifier reached this "
                    "held-out balanced accuracy (default: 0.8; classifiers without recorded accuracy: all)")
    ap.add_argument("--mlflow-run", metavar="ID", help="MLflow run to log into (default: the checkpoint's run)")
    ap.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store (default: MLFLOW_TRACKING_URI, "
                    "else the mlflow.db of the training run holding the checkpoint, else ./mlflow.db)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    ap.add_argument("--out", metavar="JSON", help="also write the results to this JSON file")
    ap.add_argument("--list", action="store_true", help="list the metric names and exit")
    return ap.parse_args(argv)


def _write_json(obj, path: str | Path) -> None:
    """Atomically, to a local path or a storage URI."""
    from . import storage

    storage.write_text(path, json.dumps(obj, indent=1) + "\n")


def _resolved(loc: str) -> str:
    from . import storage

    return storage.resolve(loc)


def build_options(args: argparse.Namespace, device: torch.device, *, rank: int = 0, world_size: int = 1,
                  gather=None, progress=print):
    """(MetricOptions, checkpoint info) for the checkpoint and the command's settings; one rank of many when
    ``world_size`` > 1 (the same rank split and gather as the training-time metrics)."""
    G, cfg, info = load_generator(args.checkpoint, device, getattr(args, "tracking_uri", None))
    s = settings_from_config(cfg)
    opts = options_from_settings(s, G, resolution=info["resolution"], alpha=info["alpha"], data=args.data,
                                 device=device, rank=rank, world_size=world_size, gather=gather,
                                 progress=progress, mirror=cfg.train.mirror)
    opts.data = args.data or opts.data
    opts.num = args.num if args.num is not None else opts.num
    opts.batch_size = args.batch
    opts.seed = args.seed
    opts.cache_dir = args.cache_dir or opts.cache_dir
    if args.ppl_crop is not None:
        opts.ppl_crop = args.ppl_crop
    if args.fid_mirror is not None:
        opts.fid_mirror = args.fid_mirror
    if args.ls_min_accuracy is not None:
        opts.ls_min_accuracy = args.ls_min_accuracy
    for key, val in (("inception", args.inception), ("vgg16", args.vgg16), ("lpips", args.lpips),
                     ("classifier", args.classifier)):
        if val:
            opts.weights[key] = val
    return opts, info


def check_weight_files(opts, names: list[str]) -> None:
    """The weight files the metrics need exist (one sentence naming the missing one); nothing is loaded."""
    from .metrics.weights import resolve_weight

    for need in sorted(extractors_needed(names)):
        for kind in {"inception": ["inception"], "lpips": ["vgg16", "lpips"], "classifier": ["classifier"]}[need]:
            resolve_weight(kind, opts.weights.get(kind))


def load_extractors(opts, names: list[str]) -> None:
    need = extractors_needed(names)
    if "inception" in need:
        get_inception(opts)
    if "lpips" in need:
        get_lpips(opts)
    if "classifier" in need:
        get_classifier(opts)


def run_metrics(opts, names: list[str], say=print) -> list[dict]:
    """Every metric in ``names`` on ``opts`` -> calc_metric's results (with 'num' the sample count used)."""
    results = []
    for name in names:
        num = opts.num or next(v for k, v in DEFAULT_NUM.items() if name.startswith(k))
        say(f"{name}: {num} samples ...")
        r = calc_metric(name, opts)
        r["num"] = num
        results.append(r)
        vals = ", ".join(f"{k} = {v:.4f}" for k, v in r["results"].items())
        say(f"{name}: {vals} ({r['seconds']:.1f} s)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "tracking_uri", None):  # the store of the training run holding the checkpoint, if any
        from .tracking import uri_for_checkpoint

        args.tracking_uri = uri_for_checkpoint(getattr(args, "checkpoint", None))
    if args.list:
        print("\n".join(list_metrics()))
        return 0
    try:
        if not args.checkpoint:
            raise MetricError("--checkpoint (or --model) is required: give a checkpoint written by training or a "
                              "registered generator (models:/NAME/VERSION).")
        names = parse_metric_list(args.metrics)
        if not names:
            raise MetricError("--metrics names no metric.")
        if args.no_mlflow and args.mlflow_run:
            raise MetricError("--mlflow-run and --no-mlflow contradict each other; give one of them.")
        if args.num is not None and args.num < 2:
            raise MetricError(f"--num must be at least 2, got {args.num}.")
        if args.workers is not None and args.workers < 1:
            raise MetricError(f"--workers must be at least 1, got {args.workers}.")
        if args.no_ray and (args.workers is not None or args.gpu or args.cpu):
            raise MetricError("--workers, --gpu and --cpu choose Ray workers; leave them out with --no-ray.")
        fids = [n for n in names if n.startswith("fid")]
        if fids and not args.data:
            raise MetricError(f"{fids[0]} needs the real images: give the dataset directory with --data.")
        device = resolve_device(args.device) if args.no_ray else torch.device("cpu")
        opts, info = build_options(args, device)
        if args.no_ray:
            # Load every extractor before the long work, so a missing file fails in the first second.
            load_extractors(opts, names)
        else:  # the workers load them; here only check that the files are there
            check_weight_files(opts, names)
        run_id = None if args.no_mlflow else (args.mlflow_run or info["extra"].get("mlflow_run_id"))
        if run_id:
            from .metrics.tracking import check_run

            check_run(run_id, args.tracking_uri)  # fail now, not after an hour, when the run does not exist

        res = info["resolution"]
        t_all = time.time()
        if args.no_ray:
            print(f"Evaluating {args.checkpoint} (kimg {info['cur_nimg'] / 1000:.1f}, {res}x{res}, alpha "
                  f"{info['alpha']:.2f}) on {device}: {', '.join(names)}")
            results = run_metrics(opts, names)
        else:
            from .ray_evaluate import evaluate_on_ray

            del opts
            results, device = evaluate_on_ray(args, names, info)
    except (MetricError, CheckpointError, ConfigError, GenerateError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("\nInterrupted; nothing was logged.", file=sys.stderr)
        return 130

    print(f"\nSummary ({time.time() - t_all:.1f} s, {device}, {res}x{res}):")
    print(f"  {'metric':<12} {'value':>12} {'samples':>9} {'seconds':>9}")
    for r in results:
        for k, v in r["results"].items():
            print(f"  {k:<12} {v:>12.4f} {r['num']:>9} {r['seconds']:>9.1f}")
    values = {k: v for r in results for k, v in r["results"].items()}
    if args.out:
        _write_json({"checkpoint": _resolved(args.checkpoint), "cur_nimg": info["cur_nimg"],
                     "resolution": res, "alpha": info["alpha"], "device": str(device),
                     "torch": torch.__version__, "results": results}, args.out)
        print(f"Wrote {args.out}")
    if run_id:
        try:
            from .metrics.tracking import log_metrics, log_protocol

            timing = {f"time_{r['name']}": r["seconds"] for r in results}
            log_metrics(run_id, {**values, **timing}, step=info["cur_nimg"], uri=args.tracking_uri)
            log_protocol(run_id, {k: v for r in results for k, v in r["protocol"].items()}, uri=args.tracking_uri)
        except MetricError as e:
            return fail(str(e))
        print(f"Logged {', '.join(values)} to MLflow run {run_id} (step {info['cur_nimg']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
