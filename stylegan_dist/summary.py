"""``python -m stylegan_dist.summary``: parameter counts and the layer / resolution table of G and D.

Examples:
  python -m stylegan_dist.summary                       # paper defaults, 1024x1024, config F
  python -m stylegan_dist.summary --set generator.architecture=traditional
  python -m stylegan_dist.summary --preset C --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cli import add_config_args, config_from_args, fail
from .config import Config, ConfigError, log2i
from .networks import build_discriminator, build_generator, count_params


def summarize(cfg: Config) -> dict:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        G = build_generator(cfg)
        D = build_discriminator(cfg)
    syn = G.synthesis
    rows = []
    r_max = log2i(cfg.model.resolution)
    for r in range(2, r_max + 1):
        g_mods = [syn.epi0, syn.conv, syn.epi1] + ([syn.const] if syn.const is not None else [])
        if syn.input_dense is not None:
            g_mods.append(syn.input_dense)
        g_block = sum(count_params(m) if isinstance(m, torch.nn.Module) else m.numel() for m in g_mods) \
            if r == 2 else count_params(syn.blocks[r - 3])
        d_block = (count_params(D.conv) + count_params(D.dense0) + count_params(D.dense1)) if r == 2 \
            else count_params(D.blocks[r - 3])
        rows.append({
            "resolution": 2**r,
            "channels": syn.channels[r],
            "layers": [2 * r - 4, 2 * r - 3] if r > 2 else [0, 1],
            "G_block_params": g_block,
            "G_torgb_params": count_params(syn.torgb[r - 2]),
            "D_block_params": d_block,
            "D_fromrgb_params": count_params(D.fromrgb[r - 2]),
        })
    return {
        "architecture": cfg.generator.architecture,
        "resolution": cfg.model.resolution,
        "G_params": count_params(G),
        "G_mapping_params": count_params(G.mapping),
        "G_synthesis_params": count_params(G.synthesis),
        "D_params": count_params(D),
        "num_ws": G.num_ws,
        "num_layers": G.num_layers,
        "mapping_layers": cfg.generator.mapping_layers,
        "layers": rows,
    }


def format_summary(s: dict) -> str:
    out = [
        f"Generator ({s['architecture']}, {s['resolution']}x{s['resolution']}): {s['G_params']:,} parameters "
        f"({s['G_params'] / 1e6:.1f}M) = mapping {s['G_mapping_params']:,} ({s['mapping_layers']} layers) "
        f"+ synthesis {s['G_synthesis_params']:,}; {s['num_layers']} synthesis layers, {s['num_ws']} w inputs",
        f"Discriminator: {s['D_params']:,} parameters ({s['D_params'] / 1e6:.1f}M)",
        "",
        f"{'res':>6} {'ch':>5} {'G layers':>9} {'G block':>11} {'toRGB':>7} {'D block':>11} {'fromRGB':>8}",
    ]
    for r in s["layers"]:
        layers = f"{r['layers'][0]}-{r['layers'][1]}"
        out.append(f"{r['resolution']:>6} {r['channels']:>5} {layers:>9} {r['G_block_params']:>11,} "
                   f"{r['G_torgb_params']:>7,} {r['D_block_params']:>11,} {r['D_fromrgb_params']:>8,}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        return fail(str(e))
    s = summarize(cfg)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
