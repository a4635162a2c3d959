"""Synthetic dataset with known generating factors, written straight into the shard format.

    python -m data_pipeline.synthetic OUT --num-images N --resolution R [--seed S]

Every image shows one large anti-aliased shape on a textured background. The factors are drawn
independently per image from ``np.random.default_rng([seed, image_id])`` (so image i is the same
whatever N, the worker count or the shard layout) and stored as labels:

==============  ===========  =====================================================================
label           kind         values
==============  ===========  =====================================================================
``background``  categorical  4 dark colours: navy, forest, charcoal, maroon
``shape``       categorical  circle, square, triangle, cross
``color``       categorical  6 vivid object colours: red, yellow, cyan, magenta, white, orange
``size``        continuous   radius as a fraction of the image side, uniform in [0.16, 0.28]
``pos_x``       continuous   centre x as a fraction of the side, uniform in [0.35, 0.65]
``pos_y``       continuous   centre y, same range (every shape lies fully inside)
``orientation`` continuous   rotation in degrees, uniform in [0, 90)
==============  ===========  =====================================================================

``--rotation DEG`` draws orientations in [0, DEG) instead; ``--rotation 0`` draws every shape upright and
stores no orientation label (every other factor and the texture of image i stay the same). ``--size LO HI`` and
``--position LO HI`` change the two ranges (the stored label ranges follow); a centre range must keep every
radius inside the image (LO - size HI >= 0, HI + size HI <= 1), so circles and the cross's arms stay inside,
while a rotated square's corners or a triangle's vertices (1.2 radii out) may touch the border when the ranges
are at that limit. Image i draws its factors in the same order whatever the ranges.

The stochastic part (not a label) is per-image random texture: a smooth random brightness field on
the background (amplitude ~12/255) and fine grain on the object (~10/255). Shapes are rendered with
4x4 (R <= 64), 2x2 (R <= 256) or no supersampling at R and every lower level is made by the same 2x2
box filter as ``prepare``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from .builder import BuildConfig, HelpFormatter, build, cli_main
from .format import DatasetError, parse_encoding_option, resolution_levels

GENERATOR_VERSION = 1
BACKGROUNDS = {
    "navy": (22, 30, 72),
    "forest": (24, 64, 36),
    "charcoal": (58, 58, 58),
    "maroon": (84, 24, 32),
}
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (232, 40, 40),
    "yellow": (240, 222, 40),
    "cyan": (40, 214, 232),
    "magenta": (222, 52, 206),
    "white": (242, 242, 242),
    "orange": (246, 140, 26),
}
SIZE_RANGE = (0.16, 0.28)
POS_RANGE = (0.35, 0.65)
ORIENTATION_RANGE = (0.0, 90.0)

LABEL_SPEC: list[dict[str, Any]] = [
    {"name": "background", "kind": "categorical", "num_classes": len(BACKGROUNDS), "classes": list(BACKGROUNDS)},
    {"name": "shape", "kind": "categorical", "num_classes": len(SHAPES), "classes": list(SHAPES)},
    {"name": "color", "kind": "categorical", "num_classes": len(COLORS), "classes": list(COLORS)},
    {"name": "size", "kind": "continuous", "range": list(SIZE_RANGE)},
    {"name": "pos_x", "kind": "continuous", "range": list(POS_RANGE)},
    {"name": "pos_y", "kind": "continuous", "range": list(POS_RANGE)},
    {"name": "orientation", "kind": "continuous", "range": list(ORIENTATION_RANGE)},
]
for _s in LABEL_SPEC:
    _s["source_name"] = _s["name"]


def label_spec(rotation: float = ORIENTATION_RANGE[1], size: tuple[float, float] = SIZE_RANGE,
               position: tuple[float, float] = POS_RANGE) -> list[dict[str, Any]]:
    """The stored labels for a dataset whose orientations lie in [0, rotation) (none for rotation 0: upright),
    radii in ``size`` and centres in ``position``."""
    spec = [dict(s) for s in LABEL_SPEC if s["name"] != "orientation" or rotation > 0]
    for s in spec:
        if s["name"] == "orientation":
            s["range"] = [0.0, float(rotation)]
        elif s["name"] == "size":
            s["range"] = [float(size[0]), float(size[1])]
        elif s["name"] in ("pos_x", "pos_y"):
            s["range"] = [float(position[0]), float(position[1])]
    return spec


def draw_factors(seed: int, index: int, rotation: float = ORIENTATION_RANGE[1], size: tuple[float, float] = SIZE_RANGE,
                 position: tuple[float, float] = POS_RANGE) -> tuple[dict[str, Any], np.random.Generator]:
    """The factors of image ``index``; orientation uniform in [0, rotation) degrees. Rotation 0 leaves the
    orientation out (every shape upright) and every other factor and the texture as they are with rotation 90.
    The draws come in the same order whatever the ranges, so only the ranged factors change with them."""
    rng = np.random.default_rng([int(seed), int(index)])
    f = {
        "background": int(rng.integers(len(BACKGROUNDS))),
        "shape": int(rng.integers(len(SHAPES))),
        "color": int(rng.integers(len(COLORS))),
        "size": float(rng.uniform(*size)),
        "pos_x": float(rng.uniform(*position)),
        "pos_y": float(rng.uniform(*position)),
        "orientation": float(rng.uniform(0.0, rotation)),  # drawn even for 0: the texture's draws stay the same
    }
    if rotation <= 0:
        del f["orientation"]
    return f, rng


def _supersample(resolution: int) -> int:
    return 4 if resolution <= 64 else (2 if resolution <= 256 else 1)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the shape's own frame (unit = radius)."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if kind == "triangle":
        inside = np.ones(u.shape, bool)
        for deg in (270.0, 30.0, 150.0):  # outward edge normals of an upward equilateral triangle
            a = np.deg2rad(deg)
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.6
        return inside
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    raise ValueError(kind)


def _smooth_noise(rng: np.random.Generator, resolution: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1]-ish at resolution x resolution (bilinear upsampling of a grid)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0.0, cells, resolution, dtype=np.float32)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    w = t - i0
    rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]  # (R, cells+1)
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]


def render(seed: int, index: int, resolution: int, rotation: float = ORIENTATION_RANGE[1],
           size: tuple[float, float] = SIZE_RANGE,
           position: tuple[float, float] = POS_RANGE) -> tuple[np.ndarray, dict[str, Any]]:
    """Render image ``index`` -> (HWC uint8 R x R x 3, factor labels)."""
    f, rng = draw_factors(seed, index, rotation, size, position)
    R = resolution
    s = _supersample(R)
    # Only the bounding box of the shape is rendered at s x s samples per pixel.
    radius = f["size"] * R
    cx, cy = f["pos_x"] * R, f["pos_y"] * R
    x0, x1 = max(0, int(np.floor(cx - radius * 1.25)) - 1), min(R, int(np.ceil(cx + radius * 1.25)) + 1)
    y0, y1 = max(0, int(np.floor(cy - radius * 1.25)) - 1), min(R, int(np.ceil(cy + radius * 1.25)) + 1)
    xs = x0 + (np.arange((x1 - x0) * s, dtype=np.float32) + 0.5) / s
    ys = y0 + (np.arange((y1 - y0) * s, dtype=np.float32) + 0.5) / s
    dx = (xs[None, :] - cx) / radius
    dy = (ys[:, None] - cy) / radius
    a = np.deg2rad(f.get("orientation", 0.0))
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    u = dx * ca + dy * sa
    v = -dx * sa + dy * ca
    mask = _shape_mask(SHAPES[f["shape"]], u, v).astype(np.float32)
    cover_box = mask.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    alpha = np.zeros((R, R), np.float32)
    alpha[y0:y1, x0:x1] = cover_box

    bg = np.asarray(list(BACKGROUNDS.values())[f["background"]], np.float32)
    fg = np.asarray(list(COLORS.values())[f["color"]], np.float32)
    bg_tex = _smooth_noise(rng, R, cells=4)[..., None] * 12.0
    fg_tex = rng.standard_normal((R, R, 1)).astype(np.float32) * 10.0
    img = (bg[None, None, :] + bg_tex) * (1.0 - alpha[..., None]) + (fg[None, None, :] + fg_tex) * alpha[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), f


class SyntheticSource:
    def __init__(self, num_images: int, resolution: int, seed: int, rotation: float = ORIENTATION_RANGE[1],
                 size: tuple[float, float] = SIZE_RANGE, position: tuple[float, float] = POS_RANGE) -> None:
        self.num_items = int(num_images)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.rotation = float(rotation)
        self.size = (float(size[0]), float(size[1]))
        self.position = (float(position[0]), float(position[1]))

    def open(self) -> None:
        pass

    def path(self, index: int) -> str:
        return f"synthetic/{index:08d}"

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any], bool]:
        image, factors = render(self.seed, index, self.resolution, self.rotation, self.size, self.position)
        return image, factors, False

    def fingerprint(self) -> dict[str, Any]:
        fp = {"kind": "synthetic", "version": GENERATOR_VERSION, "n": self.num_items, "seed": self.seed,
              "resolution": self.resolution}  # fmt: skip
        # the defaults leave earlier datasets' fingerprints as they were
        if self.rotation != ORIENTATION_RANGE[1]:
            fp["rotation"] = self.rotation
        if self.size != SIZE_RANGE:
            fp["size"] = list(self.size)
        if self.position != POS_RANGE:
            fp["position"] = list(self.position)
        return fp

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "path": None, "num_files": self.num_items}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthetic",
        description=(
            "Render a synthetic dataset whose generating factors (background colour, shape, object colour, size, "
            "position, orientation) are known and stored as labels, deterministically from --seed, straight into "
            "the shard format of data_pipeline.prepare."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    p.add_argument("--num-images", "-n", type=int, required=True, help="number of images")
    p.add_argument("--resolution", "-r", type=int, required=True, help="top resolution R (power of two)")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i depends only on (seed, i)")
    p.add_argument("--rotation", type=float, default=ORIENTATION_RANGE[1], metavar="DEG",
                   help="orientations uniform in [0, DEG) degrees; 0 draws every shape upright and stores no "
                        "orientation label (image i's other factors and texture are the same for every DEG)")
    p.add_argument("--size", type=float, nargs=2, default=list(SIZE_RANGE), metavar=("LO", "HI"),
                   help="shape radius as a fraction of the image side, uniform in [LO, HI]")
    p.add_argument("--position", type=float, nargs=2, default=list(POS_RANGE), metavar=("LO", "HI"),
                   help="shape centre x and y as fractions of the side, each uniform in [LO, HI]; every radius must "
                        "stay inside the image: LO - size HI >= 0 and HI + size HI <= 1")
    p.add_argument("--min-resolution", type=int, default=4, help="lowest level stored (4 or 8)")
    p.add_argument("--encoding", default="raw", help="per-resolution encoding, as for data_pipeline.prepare")
    p.add_argument("--workers", "-j", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard (default: automatic)")
    p.add_argument("--rows-per-group", type=int, default=None, help="rows per Parquet row group (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset already in OUT")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return p


def run(argv: list[str] | None = None, *, stop_after_shards: int | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    if args.num_images < 1:
        raise DatasetError(f"--num-images must be at least 1, got {args.num_images}.")
    if args.workers < 1:
        raise DatasetError(f"--workers must be at least 1, got {args.workers}.")
    if not 0.0 <= args.rotation <= 360.0:
        raise DatasetError(f"--rotation must be between 0 and 360 degrees, got {args.rotation:g}.")
    size, position = tuple(args.size), tuple(args.position)
    if not 0.0 < size[0] <= size[1] <= 0.5:
        raise DatasetError(f"--size needs 0 < LO <= HI <= 0.5 (radius as a fraction of the side), "
                           f"got {size[0]:g} {size[1]:g}.")
    if not position[0] <= position[1] or position[0] - size[1] < -1e-9 or position[1] + size[1] > 1 + 1e-9:
        raise DatasetError(f"--position {position[0]:g} {position[1]:g} would put shapes of radius up to "
                           f"{size[1]:g} partly outside the image; it needs LO <= HI, LO >= {size[1]:g} and "
                           f"HI <= {1 - size[1]:g}.")
    levels = resolution_levels(args.resolution, args.min_resolution)
    encodings = parse_encoding_option(args.encoding, levels)
    source = SyntheticSource(args.num_images, args.resolution, args.seed, args.rotation, size, position)
    spec = label_spec(args.rotation, size, position)
    workers = args.workers if args.num_images * args.resolution**2 > 2_000_000 else 1  # tiny: no process start-up
    cfg = BuildConfig(
        out=args.out,
        source=source,
        levels=levels,
        encodings=encodings,
        label_spec=spec,
        shard_size=args.shard_size or 0,
        rows_per_group=args.rows_per_group or 0,
        workers=workers,
        overwrite=args.overwrite,
        quiet=args.quiet,
        tool="synthetic",
        extra_manifest={
            "synthetic": {
                "generator": "data_pipeline.synthetic",
                "version": GENERATOR_VERSION,
                "seed": args.seed,
                "rotation": args.rotation,
                "size": list(size),
                "position": list(position),
                "factors": [s["name"] for s in spec],
                "stochastic": "per-image random background field and object grain (not a label)",
            }
        },
        stop_after_shards=stop_after_shards,
    )
    return build(cfg)


def main(argv: list[str] | None = None) -> int:
    return cli_main("synthetic", run, argv)


if __name__ == "__main__":
    sys.exit(main())
