"""Throughput from Parquet shards to uint8 NCHW torch batches.

    python -m data_pipeline.bench DATASET --resolution R [--batch-size B] [--seconds S] [--mode ray|local|both]

``ray`` streams through Ray Data exactly as training does (``make_ray_datasets`` + ``RayBatchSource``
on an unsplit ``DataIterator``: file shuffle, local shuffle buffer, mirror, copy to a writable torch
tensor); ``local`` uses ``LocalBatchSource`` (windowed shuffle, mirror, prefetch thread). It reports
images/s and MB/s of uint8 pixels, overall and per CPU core, excluding the start-up (first batch),
which is reported separately. Datasets smaller than the time budget are read for several epochs
(from the page cache after the first).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .builder import HelpFormatter
from .format import DatasetError, encoding_for, open_manifest


def _process_tree_cpu() -> dict[int, float] | None:
    """CPU seconds (user + system) of this process and all its descendants (Ray's raylet, workers...),
    from /proc; None where /proc is not available."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(name)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, AttributeError):
        return None
    me = os.getpid()
    keep = {}
    for pid in cpu:
        p, hops = pid, 0
        while p not in (0, 1, me) and hops < 64:
            p = parent.get(p, 0)
            hops += 1
        if p == me:
            keep[pid] = cpu[pid]
    return keep


def _cpu_delta(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
    if before is None or after is None:
        return None
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def _consume(batches, seconds: float, min_batches: int) -> tuple[float, int, int, float | None]:
    t_start = time.perf_counter()
    first = next(batches)
    startup = time.perf_counter() - t_start
    cpu0 = _process_tree_cpu()
    t0 = time.perf_counter()
    images = 0
    count = 0
    per = first.shape[0]
    try:
        while True:
            b = next(batches)
            images += b.shape[0]
            count += 1
            if count >= min_batches and time.perf_counter() - t0 >= seconds:
                break
        elapsed = time.perf_counter() - t0
        cpu = _cpu_delta(cpu0, _process_tree_cpu())
    finally:
        batches.close()  # stop reader threads before Ray shuts down
    del per
    return startup, images, elapsed, cpu


def run_local(root: str, resolution: int, batch_size: int, seconds: float, shuffle_blocks: int) -> dict:
    from .stream import LocalBatchSource

    src = LocalBatchSource(root, seed=0, shuffle_blocks=shuffle_blocks)
    startup, images, elapsed, cpu = _consume(src.batches(resolution, batch_size), seconds, 5)
    return {"mode": "local", "startup_s": startup, "images": images, "elapsed_s": elapsed, "cpu_s": cpu}


def run_ray(
    root: str, resolution: int, batch_size: int, seconds: float, shuffle_buffer: int | None, malloc: bool = True
) -> dict:
    import ray
    from ray.data import DataContext

    from .stream import RayBatchSource, default_ray_init_kwargs, make_ray_datasets

    started = False
    if not ray.is_initialized():
        kwargs = default_ray_init_kwargs()
        if not malloc:
            kwargs.pop("runtime_env")
        ray.init(**kwargs)
        started = True
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = make_ray_datasets(root, [resolution])[f"res{resolution}"]
        iterators = {f"res{resolution}": ds.iterator()}
        src = RayBatchSource(root, seed=0, dataset_shard_fn=iterators.get, shuffle_buffer=shuffle_buffer, rank=0)
        startup, images, elapsed, cpu = _consume(src.batches(resolution, batch_size), seconds, 5)
        del src, iterators, ds
    finally:
        if started:
            _quiesce_ray_iterators()
            ray.shutdown()
    return {"mode": "ray", "startup_s": startup, "images": images, "elapsed_s": elapsed, "cpu_s": cpu}


def _quiesce_ray_iterators(timeout: float = 5.0) -> None:
    """Let Ray Data's iterator threads of closed iterators exit before ``ray.shutdown()`` (a thread that
    still touches the core worker after shutdown makes Ray abort the process)."""
    import gc
    import threading

    gc.collect()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(t.name.startswith("iter_threaded") for t in threading.enumerate()):
            return
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.bench",
        description="Images/s and MB/s from Parquet shards to uint8 NCHW torch batches (Ray Data and/or local).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("dataset", metavar="DATASET", help="prepared dataset directory (has manifest.json)")
    p.add_argument("--resolution", "-r", type=int, required=True, help="resolution column to stream")
    p.add_argument("--batch-size", "-b", type=int, default=None, help="images per batch (default: 256 at <=256 px, "
                   "64 at 512, 32 at 1024)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=15.0, help="measuring time per mode, after start-up")
    p.add_argument("--mode", choices=("ray", "local", "both"), default="ray", help="which reader to measure")
    p.add_argument("--shuffle-buffer", type=int, default=4096,
                   help="RayBatchSource shuffle buffer cap in images (0 = file order only)")  # fmt: skip
    p.add_argument("--shuffle-blocks", type=int, default=16, help="LocalBatchSource window, in row groups")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc at its defaults (see stream.MALLOC_ENV)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.no_malloc_tuning:
        from .stream import tune_malloc

        tune_malloc()
    try:
        manifest = open_manifest(args.dataset)
        encoding = encoding_for(manifest, args.resolution)
    except DatasetError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    r = args.resolution
    bs = args.batch_size or (256 if r <= 256 else (64 if r <= 512 else 32))
    cores = os.cpu_count() or 1
    mb_per_image = 3 * r * r / 1e6
    enc = encoding["codec"] + ("" if encoding["codec"] != "raw" else f"/{encoding['compression']}")
    print(f"dataset {args.dataset}: {manifest['num_images']} images, resolution {r} ({enc}), batch {bs}, {cores} cores")
    modes = ["local", "ray"] if args.mode == "both" else [args.mode]
    for mode in modes:
        if mode == "local":
            res = run_local(args.dataset, r, bs, args.seconds, args.shuffle_blocks)
        else:
            res = run_ray(args.dataset, r, bs, args.seconds, args.shuffle_buffer or None, not args.no_malloc_tuning)
        ips = res["images"] / res["elapsed_s"]
        line = (
            f"{mode:5s}: {ips:,.0f} img/s, {ips * mb_per_image:,.0f} MB/s "
            f"({ips / cores:,.0f} img/s and {ips * mb_per_image / cores:,.0f} MB/s per core); "
            f"{res['images']} images in {res['elapsed_s']:.1f} s after a {res['startup_s']:.1f} s start-up"
        )
        if res.get("cpu_s"):
            per_cpu_s = res["images"] / res["cpu_s"]
            line += (
                f"; CPU used {res['cpu_s']:.1f} s = {res['cpu_s'] / res['elapsed_s']:.2f} cores busy, "
                f"{per_cpu_s:,.0f} img and {per_cpu_s * mb_per_image:,.0f} MB per CPU-second"
            )
        print(line, flush=True)
    try:
        load = os.getloadavg()[0]
        print(f"load average (1 min) at the end: {load:.2f} on {cores} cores (other work skews wall-clock figures)")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
