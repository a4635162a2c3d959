"""``python -m stylegan_dist.generate``: images from a checkpoint's G_ema, one per seed, as a grid PNG.

The latent of seed s is ``np.random.RandomState(s).randn(latent_dim)`` (as the official scripts draw
it) and its noise inputs come from ``torch.Generator().manual_seed(s)``, so an image depends only on
(checkpoint, seed, truncation). A partially grown checkpoint generates at its current resolution.

Examples:
  python -m stylegan_dist.generate --checkpoint runs/demo/checkpoints/ckpt-0000400000.pt --seeds 0-63
  python -m stylegan_dist.generate --checkpoint CKPT --seeds 0-7,100 --truncation 1.0 --out raw.png --outdir imgs/
  python -m stylegan_dist.generate --model models:/demo/1 --seeds 0-31 --out demo.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .checkpoint import CheckpointError, load_checkpoint
from .cli import fail
from .config import Config, ConfigError, from_dict
from .images import grid_image, save_png, to_uint8
from .networks import Generator, build_generator
from .schedule import phase_at


class GenerateError(ValueError):
    """A bad option; the message is one sentence."""


def parse_seeds(text: str) -> list[int]:
    """'0-3,10,12-13' -> [0, 1, 2, 3, 10, 12, 13]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise GenerateError(f"--seeds expects numbers and ranges like 0-63,100, got '{part}'.") from None
    if not seeds:
        raise GenerateError("--seeds names no seed.")
    if any(s < 0 or s >= 2**32 for s in seeds):
        raise GenerateError("Seeds must be between 0 and 2**32 - 1.")
    return seeds


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise GenerateError(f"{what} expects comma-separated numbers, got '{text}'.") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name} was asked for but this machine has no usable CUDA device.")
    return dev


def load_generator(path: str | Path, device: torch.device | str = "cpu", tracking_uri: str | None = None
                   ) -> tuple[Generator, Config, dict[str, Any]]:
    """(G_ema in eval mode, config, {'cur_nimg', 'resolution', 'alpha', 'extra'}) from a checkpoint (local path or
    storage URI) or an MLflow model (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/G_ema``),
    looked up in ``tracking_uri`` (default: MLFLOW_TRACKING_URI, else the store beside the default storage)."""
    from .mlflow_model import default_tracking_uri, is_model_uri, load_exported

    if is_model_uri(str(path)):
        return load_exported(str(path), tracking_uri or default_tracking_uri(), device)
    ck = load_checkpoint(path)
    cfg = from_dict(ck["config"])
    G = build_generator(cfg)
    try:
        G.load_state_dict(ck["G_ema"])
    except (KeyError, RuntimeError):
        raise CheckpointError(f"Checkpoint {path} holds no G_ema matching its own config.") from None
    G = G.to(device).eval().requires_grad_(False)
    cur_nimg = int(ck.get("state", {}).get("cur_nimg", 0))
    phase = phase_at(cfg, cur_nimg)
    info = {"cur_nimg": cur_nimg, "resolution": phase.resolution, "alpha": phase.alpha,
            "extra": dict(ck.get("extra") or {})}
    return G, cfg, info


def seed_latents(G: Generator, seeds: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(G.latent_dim) for s in seeds])).float()


def seed_noise(G: Generator, seeds: list[int], resolution: int) -> list[torch.Tensor]:
    """Noise maps per seed (each seed its own torch generator), stacked per layer: [[N, 1, s, s], ...]."""
    per_seed = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        shapes = G.synthesis.noise_shapes(resolution)
        per_seed.append([torch.randn(1, 1, size, size, generator=g) for _, size in shapes])
    return [torch.cat(layer) for layer in zip(*per_seed)]


@torch.no_grad()
def synthesize(G: Generator, ws: torch.Tensor, resolution: int, alpha: float, noise: list[torch.Tensor],
               device: torch.device, batch: int = 16) -> torch.Tensor:
    """ws [N, num_ws, w_dim] (CPU or device) -> images [N, C, R, R] on the CPU, in batches."""
    out = []
    for i in range(0, len(ws), batch):
        nz = [x[i:i + batch].to(device) for x in noise]
        out.append(G.synthesis(ws[i:i + batch].to(device), resolution, alpha, noise=nz).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_images(G: Generator, seeds: list[int], resolution: int, alpha: float = 1.0, truncation_psi: float = 1.0,
                    truncation_cutoff: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    device = torch.device(device)
    ws = G.map(seed_latents(G, seeds).to(device), truncation_psi, truncation_cutoff)
    return synthesize(G, ws, resolution, alpha, seed_noise(G, seeds, resolution), device)


def log_to_mlflow(run_id: str | None, paths: list[Path], uri: str | None = None) -> None:
    if run_id:
        from .metrics.tracking import log_artifacts

        log_artifacts(run_id, paths, artifact_path="figures", uri=uri)
        print(f"Logged {len(paths)} PNG(s) to MLflow run {run_id} under figures/.")


def add_generator_source(ap: argparse.ArgumentParser, required: bool = True) -> None:
    """--checkpoint PATH | --model URI (one of them; either flag takes either kind of location)."""
    group = ap.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", metavar="PATH", help="checkpoint written by training (a path or storage URI "
                       "of ckpt-*.pt / checkpoint_*/ckpt.pt); G_ema is used at the checkpoint's resolution")
    group.add_argument("--model", dest="checkpoint", metavar="URI", help="a generator training registered in "
                       "MLflow: models:/NAME/VERSION, models:/NAME@best or runs:/RUN_ID/G_ema (tracking store: "
                       "--tracking-uri, else MLFLOW_TRACKING_URI, else $STYLEGAN_DIST_STORAGE or ./runs/mlflow.db)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_source(ap)
    ap.add_argument("--seeds", required=True, help="seeds as numbers and ranges, e.g. 0-63 or 1,5,10-12")
    ap.add_argument("--truncation", type=float, metavar="PSI", help="truncation psi (1 = none; default: the "
                    "config's generator.truncation_psi, 0.7 in the paper)")
    ap.add_argument("--truncation-cutoff", type=int, metavar="L", help="truncate layers [0, L) (default: the "
                    "config's generator.truncation_cutoff, 8)")
    ap.add_argument("--out", default="grid.png", metavar="PNG", help="grid image to write (default: grid.png)")
    ap.add_argument("--cols", type=int, help="grid columns (default: about the square root of the count)")
    ap.add_argument("--cell", type=int, default=64, help="small images are enlarged (nearest) to at least this "
                    "many pixels per cell (default: 64)")
    ap.add_argument("--outdir", metavar="DIR", help="also write one PNG per seed here (seed0000.png, ...)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--mlflow-run", metavar="ID", help="also log the PNG to this MLflow run (tracking URI from "
                    "--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    ap.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store for --mlflow-run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "tracking_uri", None):  # the store of the training run holding the checkpoint, if any
        from .tracking import uri_for_checkpoint

        args.tracking_uri = uri_for_checkpoint(getattr(args, "checkpoint", None))
    from .metrics.registry import MetricError

    try:
        seeds = parse_seeds(args.seeds)
        if args.cols is not None and args.cols < 1:
            raise GenerateError("--cols must be at least 1.")
        device = resolve_device(args.device)
        if args.mlflow_run:
            from .metrics.tracking import check_run

            check_run(args.mlflow_run, args.tracking_uri)
        G, cfg, info = load_generator(args.checkpoint, device, args.tracking_uri)
        psi = cfg.generator.truncation_psi if args.truncation is None else args.truncation
        cutoff = cfg.generator.truncation_cutoff if args.truncation_cutoff is None else args.truncation_cutoff
        res = info["resolution"]
        print(f"Generating {len(seeds)} images at {res}x{res} (kimg {info['cur_nimg'] / 1000:.1f}, "
              f"psi {psi:g}, cutoff {cutoff}) on {device} ...")
        t0 = time.time()
        images = generate_images(G, seeds, res, info["alpha"], psi, cutoff, device)
        out = save_png(grid_image(images, args.cols, args.cell), args.out)
        if args.outdir:
            for s, img in zip(seeds, images):
                save_png(to_uint8(img).permute(1, 2, 0).numpy(), storage.join(args.outdir, f"seed{s:04d}.png"))
        print(f"Wrote {out} ({len(seeds)} images, {time.time() - t0:.1f} s)"
              + (f" and {len(seeds)} PNGs in {args.outdir}" if args.outdir else "") + ".")
        log_to_mlflow(args.mlflow_run, [out], args.tracking_uri)
    except (GenerateError, CheckpointError, ConfigError, MetricError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
