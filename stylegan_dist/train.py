"""``python -m stylegan_dist.train``: train StyleGAN with progressive growing on a prepared dataset.

This entry point runs the core loop in a single process (CPU or one GPU). A run lives in
STORAGE/RUN_NAME: config.yaml, checkpoints/ (newest K kept), samples/ (a grid per tick). Running the
same command again continues the run from its newest checkpoint; --restart starts over on purpose.

Examples:
  python -m data_pipeline.synthetic data/shapes32 --num-images 2048 --resolution 32
  python -m stylegan_dist.train --config configs/demo.yaml --data data/shapes32
  python -m stylegan_dist.train --data /data/ffhq-shards --set train.seed=1 --run-name ffhq-f
  python -m stylegan_dist.train --data /data/ffhq-shards --dry-run      # config + schedule, then exit
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt_mod
from .cli import add_config_args, config_from_args, fail
from .config import Config, ConfigError, from_dict, to_dict, to_yaml
from .loop import NonFiniteLossError, training_loop
from .schedule import format_schedule

# Sections whose change makes an existing checkpoint unusable (different networks).
_SHAPE_SECTIONS = ("model", "generator", "discriminator")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", metavar="DIR", help="dataset directory made by data_pipeline.prepare or "
                    "data_pipeline.synthetic (holds manifest.json)")
    add_config_args(ap)
    ap.add_argument("--storage", metavar="DIR", default="runs", help="where runs are stored (default: ./runs)")
    ap.add_argument("--run-name", metavar="NAME", help="run directory name under --storage (default: the "
                    "config file's name, or 'stylegan'); an existing run of this name is continued")
    ap.add_argument("--restart", action="store_true", help="discard the existing checkpoints of this run and "
                    "start from scratch")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--max-ticks", type=int, metavar="N", help="stop after N ticks of this invocation "
                    "(a checkpoint is written; run again to continue)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and the schedule table, "
                    "then exit")
    return ap.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but this machine has no usable CUDA device.")
    return dev


def check_resume_compatible(cfg: Config, ckpt_cfg: dict, path: Path) -> None:
    new = to_dict(cfg)
    changed = [f"{s}.{k}" for s in _SHAPE_SECTIONS for k in new[s] if new[s][k] != ckpt_cfg.get(s, {}).get(k)]
    if changed:
        raise ConfigError(f"The run's checkpoint {path} was made with different networks ({', '.join(changed)}); "
                          f"use another --run-name or --restart.")


def open_source(data: str, cfg: Config):
    from data_pipeline.stream import DatasetError, LocalBatchSource  # imported here: pyarrow is not needed for --help

    try:
        source = LocalBatchSource(data, seed=cfg.train.seed, mirror=cfg.train.mirror)
    except DatasetError as e:
        raise ConfigError(str(e)) from None
    needed = [r for r in (2**i for i in range(2, 20)) if cfg.schedule.start_resolution <= r <= cfg.model.resolution]
    missing = [r for r in needed if r not in source.resolutions]
    if missing:
        have = f"{min(source.resolutions)}..{source.max_resolution}" if source.resolutions else "none"
        raise ConfigError(f"Dataset {data} has resolutions {have} but training needs {needed[0]}..{needed[-1]}; "
                          f"set model.resolution to at most {source.max_resolution} or prepare the data at "
                          f"{cfg.model.resolution}.")
    return source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            print(to_yaml(cfg))
            print(format_schedule(cfg))
            return 0
        if not args.data:
            raise ConfigError("--data is required: give a dataset directory made by data_pipeline.prepare or "
                              "data_pipeline.synthetic.")
        if not Path(args.data).exists():
            raise ConfigError(f"Dataset directory {args.data} does not exist.")
        device = resolve_device(args.device)
        run_name = args.run_name or (Path(args.config).stem if args.config else "stylegan")
        run_dir = Path(args.storage).expanduser().resolve() / run_name
        ckpt_dir = run_dir / "checkpoints"
        resume = None
        if args.restart and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        latest = ckpt_mod.latest_checkpoint(ckpt_dir)
        if latest is not None:
            resume = ckpt_mod.load_checkpoint(latest, map_location=device)
            check_resume_compatible(cfg, resume["config"], latest)
            old = from_dict(resume["config"])
            if old != cfg:
                print(f"note: continuing {run_dir} with a changed config (schedule/loss/train keys differ).")
        source = open_source(args.data, cfg)
    except (ConfigError, ckpt_mod.CheckpointError) as e:
        return fail(str(e))

    print(f"Run directory: {run_dir}")
    print(f"Device: {device}; dataset: {args.data} ({source.num_images} images); "
          f"G {cfg.generator.architecture}, final resolution {cfg.model.resolution}, "
          f"{cfg.schedule.total_kimg:g} kimg")
    t0 = time.time()
    try:
        result = training_loop(cfg, source, run_dir, device=device, resume=resume, stop_after_ticks=args.max_ticks)
    except NonFiniteLossError as e:
        return fail(str(e), code=1)
    except KeyboardInterrupt:
        kept = ckpt_mod.latest_checkpoint(ckpt_dir)
        print(f"\nInterrupted. Newest checkpoint: {kept or 'none yet'}; run the same command to continue.",
              file=sys.stderr)
        return 130

    state = "finished" if result.finished else f"stopped at kimg {result.cur_nimg / 1000:.3f} (run again to continue)"
    print(f"\nTraining {state} after {time.time() - t0:.1f}s.")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  samples:    {result.grid}")
    print(f"  config:     {run_dir / 'config.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
