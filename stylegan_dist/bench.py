"""``python -m stylegan_dist.bench``: throughput of the real training step, per resolution.

Runs ``loop.train_step`` (D on reals with R1 every step, D on fakes, G step with style mixing 0.9, EMA,
``w_avg``) on synthetic tensors with the networks grown to each resolution (fade alpha 1), warm-up
excluded, and prints per resolution: batch, img/s, sec/kimg, peak memory, FLOP per image (measured with
``torch.utils.flop_counter`` on one step: forward, backward and R1's double backward) and achieved
TFLOP/s, with model FLOP utilisation when the device's peak is known. Needs torch only (no Ray).

Examples:
  python -m stylegan_dist.bench --resolutions 8,16,32 --batch 8 --set model.fmap_base=512   # CPU smoke
  python -m stylegan_dist.bench --precision bf16 --compile --json                          # H100, full size
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from .cli import add_config_args, config_from_args, fail
from .config import Config, ConfigError, apply_overrides, resolve
from .loop import build_models, compile_models, configure_perf, make_optimizer, train_step
from .loss import StepContext, StyleGANLoss

# The comparison table of the issue: rosinality/style-based-gan-pytorch's training step on one H100
# (R1 every step, mixing 0.9, EMA, fp32 with TF32 convolutions), img/s at these batch sizes.
REFERENCE_H100 = {8: (128, 3282), 16: (128, 2415), 32: (64, 693), 64: (32, 224), 128: (32, 124),
                  256: (16, 67), 512: (8, 19.8), 1024: (4, 6.0)}

# Dense peak TFLOP/s by device-name fragment and precision (vendor data sheets, SXM parts).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table[precision]
    return None


def bench_config(base: Config, resolution: int, precision: str, compile_: bool, channels_last: bool) -> Config:
    over = {"model.resolution": resolution, "perf.precision": precision, "perf.compile": compile_,
            "perf.channels_last": channels_last}
    return resolve(apply_overrides(base, over, "bench"))


class _FlopCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums torch's per-op FLOP formulas (matmul, conv and their backward) over every op executed.

    FlopCounterMode itself cannot be used: its module-tracking hooks break autograd.grad(create_graph=True),
    which R1 needs."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def count_flops(cfg: Config, batch: int, device: torch.device) -> float:
    """FLOP of one training step (G and D forward/backward, R1's double backward), per image."""
    G, D, G_ema = build_models(cfg, device)
    opt_G, opt_D = make_optimizer(cfg, G, 1e-3), make_optimizer(cfg, D, 1e-3)
    loss = StyleGANLoss(cfg, G, D, device)
    reals = torch.rand(batch, cfg.model.num_channels, cfg.model.resolution, cfg.model.resolution, device=device) * 2 - 1
    ctx = StepContext(cfg.model.resolution, 1.0, batch)
    with _FlopCount() as counter:
        train_step(G, D, G_ema, opt_G, opt_D, loss, reals, ctx, 0.999)
    return counter.total / batch


def run_resolution(cfg: Config, batch: int, device: torch.device, steps: int, warmup: int) -> dict:
    configure_perf(cfg, device)
    G, D, G_ema = build_models(cfg, device)
    opt_G, opt_D = make_optimizer(cfg, G, 1e-3), make_optimizer(cfg, D, 1e-3)
    loss = StyleGANLoss(cfg, G, D, device, D_forward=compile_models(G, D) if cfg.perf.compile else None)
    r = cfg.model.resolution
    reals = torch.rand(batch, cfg.model.num_channels, r, r, device=device) * 2 - 1
    if cfg.perf.channels_last:
        reals = reals.contiguous(memory_format=torch.channels_last)
    ctx = StepContext(r, 1.0, batch)
    ema_beta = 0.5 ** (batch / (cfg.optim.ema_halflife_kimg * 1000))

    def step():
        return train_step(G, D, G_ema, opt_G, opt_D, loss, reals, ctx, ema_beta)

    for _ in range(warmup):
        stats = step()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stats = step()
    sync()
    seconds = time.perf_counter() - t0
    finite = all(math.isfinite(float(v)) for v in stats.values())
    img_s = steps * batch / seconds
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"img_per_sec": img_s, "sec_per_kimg": 1000.0 / img_s, "peak_mem_gb": mem, "finite": finite,
            "step_ms": 1000.0 * seconds / steps}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--resolutions", default="8,16,32,64,128,256,512,1024",
                    help="comma-separated resolutions (default 8..1024)")
    ap.add_argument("--batch", default="table", help="'table': the comparison batch sizes of the rosinality "
                    "H100 table (8:128 ... 1024:4); 'schedule': our schedule's per-GPU batch; or a number")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                    help="fp32 (no TF32), tf32 (TF32 matmul/conv, the reference's setting) or bf16 autocast "
                    "(default tf32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile G and D")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per resolution (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        base = config_from_args(args)
        resolutions = [int(x) for x in args.resolutions.split(",") if x.strip()]
        if not resolutions or any(r < 8 or r & (r - 1) for r in resolutions):
            raise ConfigError(f"--resolutions must be powers of two >= 8, got '{args.resolutions}'.")
        if args.batch not in ("table", "schedule") and not args.batch.isdigit():
            raise ConfigError(f"--batch must be 'table', 'schedule' or a number, got '{args.batch}'.")
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0.")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device} was asked for but no CUDA device is usable.")
    except (ConfigError, ValueError) as e:
        return fail(str(e))

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(device, args.precision)
    results = []
    if not args.json:
        print(f"device {dev_name}, precision {args.precision}, compile {args.compile}, channels_last "
              f"{args.channels_last}, torch {torch.__version__}, steps {args.steps} (+{args.warmup} warm-up)")
        print(f"{'res':>5} {'batch':>5} {'img/s':>9} {'sec/kimg':>9} {'mem GB':>7} {'GFLOP/img':>10} {'TFLOP/s':>8} "
              f"{'MFU':>6} {'vs ref':>7}")
    for r in resolutions:
        cfg = bench_config(base, r, args.precision, args.compile, args.channels_last)
        if args.batch == "table":
            batch = REFERENCE_H100.get(r, (4, None))[0]
        elif args.batch == "schedule":
            batch = cfg.schedule.batch_per_gpu.get(r, cfg.schedule.batch_base)
        else:
            batch = int(args.batch)
        out = run_resolution(cfg, batch, device, args.steps, args.warmup)
        # Shapes alone determine FLOP: count on the meta device (no memory, no compute).
        flop = None if args.no_flops else count_flops(cfg, min(batch, 4), torch.device("meta"))
        tflops = flop * out["img_per_sec"] / 1e12 if flop else None
        ref = REFERENCE_H100.get(r)
        speedup = out["img_per_sec"] / ref[1] if ref and ref[0] == batch and "H100" in dev_name else None
        row = {"resolution": r, "batch": batch, **out, "flop_per_img": flop, "tflops": tflops,
               "mfu": tflops / peak if tflops and peak else None, "speedup_vs_reference": speedup}
        results.append(row)
        if not args.json:
            mem = f"{row['peak_mem_gb']:.2f}" if row["peak_mem_gb"] is not None else "-"
            gf = f"{flop / 1e9:.2f}" if flop else "-"
            tf = f"{tflops:.3f}" if tflops else "-"
            mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] else "-"
            sp = f"{speedup:.2f}x" if speedup else "-"
            print(f"{r:>5} {batch:>5} {out['img_per_sec']:>9.1f} {out['sec_per_kimg']:>9.2f} {mem:>7} {gf:>10} "
                  f"{tf:>8} {mfu:>6} {sp:>7}", flush=True)
    if args.json:
        print(json.dumps({"device": dev_name, "precision": args.precision, "compile": args.compile,
                          "channels_last": args.channels_last, "torch": torch.__version__, "steps": args.steps,
                          "warmup": args.warmup, "results": results}, indent=2))
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
