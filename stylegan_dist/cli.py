"""Shared command-line pieces: config arguments and one-sentence errors."""

from __future__ import annotations

import argparse
import sys

from .config import TABLE1_PRESETS, Config, build_config


def add_config_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", metavar="FILE", help="YAML file with config sections (model, generator, "
                    "discriminator, loss, schedule, optim, train, perf); defaults are the paper's FFHQ setup")
    ap.add_argument("--preset", choices=sorted(TABLE1_PRESETS), help="paper Table 1 configuration A-F "
                    "(applied before --config and --set)")
    ap.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="set_args",
                    help="override one key, e.g. --set generator.mapping_layers=2 (repeatable; values are YAML)")


def config_from_args(args: argparse.Namespace) -> Config:
    return build_config(args.config, args.set_args, preset=args.preset)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
