"""``python -m stylegan_dist.figures``: the paper's qualitative figures from a checkpoint, as PNGs.

  style-mixing  Figure 3. Source A images down the left, source B images along the top; cell (i, j) is A_i
                with the styles of one layer range copied from B_j: coarse (4-8 px layers, 0-3), middle
                (16-32 px, 4-7) or fine (64 px and up, 8+), three, two and one rows as in the paper.
                Truncation psi 0.7 on layers [0, 8) (the config's values); one fixed noise for every image.
  noise         Figure 4. Per seed: the image under several noise draws, then the per-pixel standard
                deviation over --samples draws (of the channel mean, in 0..255 units, x4 as the official
                figure), so bright pixels are those the noise inputs change.
  truncation    Figure 8. Rows are seeds, columns psi values (1, 0.7, 0.5, 0, -0.5, -1), truncation on
                every layer as in the figure.
  all           The three, into --outdir.

Latents and noise per seed are drawn as in ``stylegan_dist.generate``. Images smaller than --cell pixels
are enlarged (nearest) so a person can look at them. The figures also go into the checkpoint's MLflow training run
(or --mlflow-run) as time-stepped images (figures/style_mixing, figures/noise, figures/truncation at step = the
checkpoint's image count), so the run's image panel shows them beside the sample grids; --no-mlflow skips that.

Examples:
  python -m stylegan_dist.figures all --checkpoint CKPT --outdir figures/
  python -m stylegan_dist.figures style-mixing --checkpoint CKPT --out mixing.png --mlflow-run RUN_ID
  python -m stylegan_dist.figures all --model models:/demo/1 --outdir figures/
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import storage
from .checkpoint import CheckpointError
from .cli import fail
from .config import ConfigError
from .generate import (
    GenerateError,
    add_generator_source,
    load_generator,
    parse_floats,
    parse_seeds,
    resolve_device,
    seed_latents,
    seed_noise,
    synthesize,
)
from .images import save_png, to_uint8
from .networks import Generator

# Figure seeds of the official release's generate_figures.py (any seeds work).
STYLE_A_SEEDS = "888,829,1898,1733,1614,845"
STYLE_B_SEEDS = "639,701,687,615,2268"
NOISE_SEEDS = "1157,1012"
TRUNC_SEEDS = "91,388"
TRUNC_PSIS = "1,0.7,0.5,0,-0.5,-1"

# Paper section 3.1: coarse = 4^2-8^2 layers, middle = 16^2-32^2, fine = 64^2 and up (two layers per resolution).
_GROUP_LAYERS = {"coarse": (0, 4), "middle": (4, 8), "fine": (8, None)}


def style_groups(G: Generator, resolution: int) -> dict[str, range]:
    """Layer ranges of the non-empty style groups at ``resolution``."""
    active = G.active_layers(resolution)
    out = {}
    for name, (lo, hi) in _GROUP_LAYERS.items():
        r = range(lo, min(active, hi if hi is not None else active))
        if len(r):
            out[name] = r
    return out


def default_row_groups(groups: list[str], rows: int) -> list[str]:
    """The paper's 3 coarse / 2 middle / 1 fine rows, scaled to ``rows`` and to the groups that exist."""
    pattern = {3: ["coarse"] * 3 + ["middle"] * 2 + ["fine"], 2: ["coarse"] * 3 + ["middle"] * 3,
               1: [groups[0]] * 6}[len(groups)]
    return [pattern[min(int(i * len(pattern) / rows), len(pattern) - 1)] for i in range(rows)]


def style_mixing_ws(ws_a: torch.Tensor, ws_b: torch.Tensor, row_ranges: list[range]) -> torch.Tensor:
    """ws_a [R, L, D], ws_b [C, L, D] -> [R, C, L, D]: row i is A_i with layers row_ranges[i] taken from each B_j."""
    assert ws_a.shape[0] == len(row_ranges), (ws_a.shape, len(row_ranges))
    out = ws_a[:, None].repeat(1, ws_b.shape[0], 1, 1)
    for i, r in enumerate(row_ranges):
        idx = torch.tensor(list(r), dtype=torch.long)
        out[i][:, idx] = ws_b[:, idx]
    return out


def compose(cells: list[list[torch.Tensor | None]], cell: int) -> np.ndarray:
    """Rows of images [C, H, W] in [-1, 1] (None: white) -> HWC uint8 canvas with square cells of `size` px.

    Cells are enlarged by an integer nearest factor to at least ``cell`` pixels."""
    first = next(c for row in cells for c in row if c is not None)
    h = first.shape[-1]
    size = h * max(1, math.ceil(cell / h))
    ch = 3
    canvas = np.full((len(cells) * size, max(len(r) for r in cells) * size, ch), 255, np.uint8)
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            if img is None:
                continue
            img = img.float()
            if img.shape[0] == 1:
                img = img.repeat(3, 1, 1)
            if img.shape[-1] != size:
                img = F.interpolate(img[None], size=(size, size), mode="nearest")[0]
            canvas[i * size:(i + 1) * size, j * size:(j + 1) * size] = to_uint8(img).permute(1, 2, 0).numpy()
    return canvas


@torch.no_grad()
def style_mixing_figure(G: Generator, a_seeds: list[int], b_seeds: list[int], resolution: int, alpha: float = 1.0,
                        psi: float = 0.7, cutoff: int | None = 8, row_groups: list[str] | None = None,
                        device: torch.device | str = "cpu", cell: int = 128, noise_seed: int = 0
                        ) -> tuple[np.ndarray, list[str]]:
    if G.num_ws < 2:
        raise GenerateError("Style mixing needs a style-based generator (one w per layer); this one is traditional.")
    device = torch.device(device)
    groups = style_groups(G, resolution)
    row_groups = row_groups or default_row_groups(list(groups), len(a_seeds))
    if len(row_groups) != len(a_seeds):
        raise GenerateError(f"--row-styles names {len(row_groups)} rows but there are {len(a_seeds)} source A seeds.")
    unknown = [g for g in row_groups if g not in groups]
    if unknown:
        raise GenerateError(f"Style group '{unknown[0]}' has no layers at {resolution}x{resolution}; use "
                            f"{', '.join(groups)}.")
    ws_a = G.map(seed_latents(G, a_seeds).to(device), psi, cutoff).cpu()
    ws_b = G.map(seed_latents(G, b_seeds).to(device), psi, cutoff).cpu()
    mixed = style_mixing_ws(ws_a, ws_b, [groups[g] for g in row_groups])  # [R, C, L, D]
    base = seed_noise(G, [noise_seed], resolution)

    def render(ws: torch.Tensor) -> torch.Tensor:
        return synthesize(G, ws, resolution, alpha, [x.expand(len(ws), -1, -1, -1) for x in base], device)

    img_a, img_b = render(ws_a), render(ws_b)
    img_mix = render(mixed.reshape(-1, *mixed.shape[2:])).reshape(len(a_seeds), len(b_seeds), *img_a.shape[1:])
    cells: list[list[torch.Tensor | None]] = [[None] + list(img_b)]
    for i in range(len(a_seeds)):
        cells.append([img_a[i]] + list(img_mix[i]))
    return compose(cells, cell), row_groups


@torch.no_grad()
def noise_figure(G: Generator, seeds: list[int], resolution: int, alpha: float = 1.0, samples: int = 100,
                 shown: int = 4, device: torch.device | str = "cpu", cell: int = 128, batch: int = 16
                 ) -> np.ndarray:
    """Rows: [shown images of one latent under different noise..., per-pixel std over ``samples`` draws]."""
    if samples < 2:
        raise GenerateError("--samples must be at least 2 to measure a standard deviation.")
    device = torch.device(device)
    rows = []
    for s in seeds:
        ws = G.map(seed_latents(G, [s]).to(device))  # no truncation (psi 1) as in Figure 4
        g = torch.Generator().manual_seed(s + 1)
        total = torch.zeros(resolution, resolution, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        shown_imgs = []
        for i in range(0, samples, batch):
            n = min(batch, samples - i)
            noise = [torch.randn(n, 1, size, size, generator=g) for _, size in G.synthesis.noise_shapes(resolution)]
            imgs = synthesize(G, ws.expand(n, -1, -1), resolution, alpha, noise, device)
            shown_imgs += list(imgs[:max(0, shown - len(shown_imgs))])
            m = to_uint8(imgs).double().mean(dim=1)  # [n, H, W] channel mean in 0..255
            total += m.sum(0)
            total_sq += m.square().sum(0)
        var = (total_sq / samples - (total / samples).square()).clamp(min=0)
        std = (var.sqrt() * 4).clamp(0, 255)
        std_img = (std.float() / 127.5 - 1.0)[None].repeat(3, 1, 1)  # greyscale, [-1, 1] for compose
        rows.append(shown_imgs + [std_img])
    return compose(rows, cell)


@torch.no_grad()
def truncation_figure(G: Generator, seeds: list[int], psis: list[float], resolution: int, alpha: float = 1.0,
                      cutoff: int | None = None, device: torch.device | str = "cpu", cell: int = 128,
                      noise_seed: int = 0) -> np.ndarray:
    device = torch.device(device)
    z = seed_latents(G, seeds).to(device)
    base = seed_noise(G, [noise_seed], resolution)
    rows = []
    for i in range(len(seeds)):
        ws = torch.cat([G.map(z[i:i + 1], psi, cutoff) for psi in psis])
        rows.append(list(synthesize(G, ws, resolution, alpha, [x.expand(len(psis), -1, -1, -1) for x in base],
                                    device)))
    return compose(rows, cell)


# --------------------------------------------------------------------------------------------------
# Command line


def _common(p: argparse.ArgumentParser, single: bool) -> None:
    add_generator_source(p)
    if single:
        p.add_argument("--out", metavar="PNG", help="image to write (default: <figure>.png)")
    p.add_argument("--cell", type=int, default=128, help="enlarge small images to at least this many pixels per "
                   "cell (nearest; default: 128)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--mlflow-run", metavar="ID", help="MLflow run to log the figures into, as images at step = the "
                   "checkpoint's image count (default: the training run of the checkpoint or model, when its "
                   "tracking store is found)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else "
                   "the mlflow.db beside the training run, else ./mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the figures to MLflow")


def _mixing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a-seeds", default=STYLE_A_SEEDS, help=f"source A seeds, one per row (default: {STYLE_A_SEEDS})")
    p.add_argument("--b-seeds", default=STYLE_B_SEEDS, help=f"source B seeds, one per column (default: "
                   f"{STYLE_B_SEEDS})")
    p.add_argument("--row-styles", help="style group each row copies from B, comma-separated coarse/middle/fine "
                   "(default: 3 coarse, 2 middle, 1 fine rows, scaled to the rows and the groups that exist)")
    p.add_argument("--truncation", type=float, help="psi (default: the config's generator.truncation_psi)")
    p.add_argument("--truncation-cutoff", type=int, help="layers [0, L) truncated (default: the config's)")


def _noise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise-seeds", default=NOISE_SEEDS, help=f"one row per seed (default: {NOISE_SEEDS})")
    p.add_argument("--samples", type=int, default=100, help="noise draws for the standard deviation (default: 100)")
    p.add_argument("--shown", type=int, default=4, help="noise draws shown per row (default: 4)")


def _trunc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trunc-seeds", default=TRUNC_SEEDS, help=f"one row per seed (default: {TRUNC_SEEDS})")
    p.add_argument("--psi", default=TRUNC_PSIS, help=f"one column per psi (default: {TRUNC_PSIS})")
    p.add_argument("--trunc-cutoff", type=int, help="truncate only layers [0, L) (default: every layer, as in "
                   "Figure 8)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    p = sub.add_parser("style-mixing", help="Figure 3: style mixing grid")
    _common(p, True)
    _mixing_args(p)
    p = sub.add_parser("noise", help="Figure 4: stochastic variation and its per-pixel standard deviation")
    _common(p, True)
    _noise_args(p)
    p = sub.add_parser("truncation", help="Figure 8: truncation sweep")
    _common(p, True)
    _trunc_args(p)
    p = sub.add_parser("all", help="all three figures into --outdir")
    _common(p, False)
    p.add_argument("--outdir", default="figures", metavar="DIR", help="directory for the PNGs (default: figures)")
    _mixing_args(p)
    _noise_args(p)
    _trunc_args(p)
    return ap.parse_args(argv)


FIGURE_KEYS = {"style-mixing": "figures/style_mixing", "noise": "figures/noise", "truncation": "figures/truncation"}


def run(args: argparse.Namespace, done: dict | None = None) -> list[Path]:
    """Write the figures; ``done`` (when given) receives the checkpoint's info and {figure: canvas}."""
    if args.cell < 1:
        raise GenerateError("--cell must be at least 1.")
    device = resolve_device(args.device)
    G, cfg, info = load_generator(args.checkpoint, device, args.tracking_uri)
    res, alpha = info["resolution"], info["alpha"]
    which = ["style-mixing", "noise", "truncation"] if args.figure == "all" else [args.figure]
    names = {"style-mixing": "figure03-style-mixing.png", "noise": "figure04-noise-detail.png",
             "truncation": "figure08-truncation-trick.png"}
    written = []
    print(f"Checkpoint at kimg {info['cur_nimg'] / 1000:.1f}: {res}x{res}, {G.num_ws} style input(s).")
    for fig in which:
        t0 = time.time()
        if args.figure == "all":
            out = storage.join(args.outdir, names[fig])  # a directory or a storage URI
        else:
            out = storage.resolve(args.out or names[fig])
        if fig == "style-mixing":
            psi = cfg.generator.truncation_psi if args.truncation is None else args.truncation
            cutoff = cfg.generator.truncation_cutoff if args.truncation_cutoff is None else args.truncation_cutoff
            rows = [r.strip() for r in args.row_styles.split(",")] if args.row_styles else None
            canvas, groups = style_mixing_figure(G, parse_seeds(args.a_seeds), parse_seeds(args.b_seeds), res, alpha,
                                                 psi, cutoff, rows, device, args.cell)
            layers = style_groups(G, res)
            legend = "; ".join(f"row {i + 1}: {g} (layers {layers[g].start}-{layers[g].stop - 1})"
                               for i, g in enumerate(groups))
            print(f"  style mixing rows take from B: {legend}")
        elif fig == "noise":
            canvas = noise_figure(G, parse_seeds(args.noise_seeds), res, alpha, args.samples, args.shown, device,
                                  args.cell)
        else:
            canvas = truncation_figure(G, parse_seeds(args.trunc_seeds), parse_floats(args.psi, "--psi"), res, alpha,
                                       args.trunc_cutoff, device, args.cell)
        save_png(canvas, out)
        print(f"Wrote {out} ({canvas.shape[1]}x{canvas.shape[0]} px, {time.time() - t0:.1f} s).")
        written.append(out)
        if done is not None:
            done.setdefault("canvases", {})[fig] = canvas
    if done is not None:
        done["info"] = info
    return written


def _log_figures(args: argparse.Namespace, done: dict) -> None:
    """Figures as time-stepped images (figures/style_mixing, ...) at step = the checkpoint's image count, into
    --mlflow-run or the checkpoint's own training run."""
    from .metrics.registry import MetricError
    from .metrics.tracking import run_logger

    info = done["info"]
    run_id = args.mlflow_run or info["extra"].get("mlflow_run_id")
    if not run_id or args.no_mlflow:
        return
    if not args.mlflow_run and not args.tracking_uri:  # the training run's store is not here: nothing to look up
        return
    try:
        logger = run_logger(run_id, args.tracking_uri)
    except MetricError as e:
        if args.mlflow_run:
            raise
        print(f"Not logged to MLflow: the checkpoint's training run is not in reach ({e})")
        return
    for fig, canvas in done["canvases"].items():
        logger.log_image(canvas, key=FIGURE_KEYS[fig], step=info["cur_nimg"])
    print(f"Logged {', '.join(FIGURE_KEYS[f] for f in done['canvases'])} to MLflow run {run_id} as images at step "
          f"{info['cur_nimg']}.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not getattr(args, "tracking_uri", None):  # the store of the training run holding the checkpoint, if any
        from .tracking import uri_for_checkpoint

        args.tracking_uri = uri_for_checkpoint(getattr(args, "checkpoint", None))
    from .metrics.registry import MetricError

    try:
        if args.no_mlflow and args.mlflow_run:
            raise GenerateError("--mlflow-run and --no-mlflow contradict each other; give one of them.")
        if args.mlflow_run:
            from .metrics.tracking import check_run

            check_run(args.mlflow_run, args.tracking_uri)
        done: dict = {}
        run(args, done)
        _log_figures(args, done)
    except (GenerateError, CheckpointError, ConfigError, MetricError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
