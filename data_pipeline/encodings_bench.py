"""Measure size and decode speed of candidate per-resolution encodings (how the format was chosen).

    python -m data_pipeline.encodings_bench [--images DIR_OR_ZIP] [--resolutions 32,256,1024] [--noise 3]

Without ``--images`` it uses the natural photographs that ship inside installed packages (scikit-learn's
china.jpg and flower.jpg, matplotlib's grace_hopper.jpg), cut into random square crops and resized to
each resolution with Lanczos, optionally with Gaussian grain (``--noise``, in 8-bit units) added to
imitate the fine detail of real high-resolution photographs. For every candidate it writes one Parquet
file (like a shard column) and reports bytes per image and single-core decode speed from a warm page
cache to an ``[n, 3, R, R]`` uint8 array. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .builder import HelpFormatter
from .format import arrow_type, column_name, decode_column, encode_image, normalize_encoding, parquet_compression

CANDIDATES = {
    "raw": {"codec": "raw", "compression": "none"},
    "raw-lz4": {"codec": "raw", "compression": "lz4"},
    "raw-snappy": {"codec": "raw", "compression": "snappy"},
    "raw-zstd": {"codec": "raw", "compression": "zstd"},
    "png-1": {"codec": "png", "compress_level": 1},
    "png-6": {"codec": "png", "compress_level": 6},
}


def bundled_photos() -> list[Path]:
    found = []
    for mod, rel in (("sklearn.datasets", "images/china.jpg"), ("sklearn.datasets", "images/flower.jpg"),
                     ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")):  # fmt: skip
        try:
            m = __import__(mod, fromlist=["__file__"])
        except ImportError:
            continue
        p = Path(m.__file__).parent / rel
        if p.exists():
            found.append(p)
    return found


def photo_crops(paths: list[Path], resolution: int, count: int, noise: float, seed: int = 0) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in paths]
    out = np.empty((count, resolution, resolution, 3), np.uint8)
    for i in range(count):
        im = photos[i % len(photos)]
        w, h = im.size
        side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        crop = im.crop((x, y, x + side, y + side)).resize((resolution, resolution), Image.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(crop, np.float32)
        if noise > 0:
            a = a + rng.normal(0.0, noise, a.shape)
        out[i] = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return out


def measure(images_hwc: np.ndarray, resolution: int, name: str, spec: dict, workdir: str, repeats: int = 3) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    enc = normalize_encoding(spec)
    t0 = time.perf_counter()
    values = [encode_image(img, enc, hwc=True) for img in images_hwc]
    t_enc = time.perf_counter() - t0
    col = column_name(resolution)
    table = pa.table({col: pa.array(values, type=arrow_type(resolution, enc))})
    path = os.path.join(workdir, f"{name}-{resolution}.parquet")
    pq.write_table(table, path, compression=parquet_compression(enc), use_dictionary=False, write_statistics=False,
                   row_group_size=max(8, min(256, (32 << 20) // (3 * resolution * resolution))))  # fmt: skip
    size = os.path.getsize(path)
    n = len(images_hwc)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        t = pq.read_table(path, columns=[col], use_threads=False, memory_map=True)
        arr = decode_column(t.column(col), resolution, enc)
        arr = np.array(arr, copy=True)  # a writable array, as a loader needs
        best = min(best, time.perf_counter() - t0)
    ref = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2))
    assert np.array_equal(arr, ref), f"{name} is not lossless"
    raw_mb = n * 3 * resolution * resolution / 1e6
    return {
        "name": name,
        "resolution": resolution,
        "bytes_per_image": size / n,
        "ratio": (3 * resolution * resolution) / (size / n),
        "decode_img_s": n / best,
        "decode_mb_s": raw_mb / best,
        "encode_img_s": n / t_enc,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.encodings_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)  # fmt: skip
    p.add_argument("--images", default=None, help="folder of photographs to use instead of the bundled ones")
    p.add_argument("--resolutions", default="32,128,256,1024", help="comma-separated resolutions")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian grain added to the crops (8-bit units)")
    p.add_argument("--megabytes", type=float, default=48.0, help="raw pixel MB per resolution to encode")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="which encodings to try")
    args = p.parse_args(argv)
    if args.images:
        exts = {".png", ".jpg", ".jpeg", ".webp"}
        paths = sorted(q for q in Path(args.images).rglob("*") if q.suffix.lower() in exts)[:64]
    else:
        paths = bundled_photos()
    if not paths:
        print("encodings_bench: error: no photographs found; pass --images DIR.", file=sys.stderr)
        return 2
    print(f"photos: {', '.join(q.name for q in paths[:8])}{' ...' if len(paths) > 8 else ''}; noise sigma {args.noise}")
    print("| R | encoding | bytes/image | vs raw | decode img/s/core | decode MB/s/core | encode img/s/core |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in [int(x) for x in args.resolutions.split(",")]:
            count = max(8, int(args.megabytes * 1e6 // (3 * r * r)))
            imgs = photo_crops(paths, r, count, args.noise)
            for name in args.candidates.split(","):
                res = measure(imgs, r, name, CANDIDATES[name], tmp)
                print(f"| {r} | {name} | {res['bytes_per_image']:,.0f} | {1 / res['ratio']:.2f} | "
                      f"{res['decode_img_s']:,.0f} | {res['decode_mb_s']:,.0f} | {res['encode_img_s']:,.0f} |",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
