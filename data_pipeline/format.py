"""The on-disk shard format: manifest, columns, per-resolution encodings, box-filter pyramid.

A prepared dataset is a directory::

    OUT/manifest.json              # written last; its presence means "complete"
    OUT/shards/shard-00000.parquet # Parquet files, one row per image

Columns of every shard:

* ``id`` (int64): image id. For ``prepare`` it is the index of the file in the sorted source listing
  (so FFHQ's ``00000.png`` gets id 0); ids of skipped files are simply absent. For ``synthetic`` it is
  the image index. Ids grow strictly through the shards in manifest order.
* ``path`` (string): source path relative to SOURCE (``synthetic/<id>`` for synthetic images).
* ``res4`` ... ``resR`` (one per power-of-two level): the image at that resolution, encoded as
  described by ``manifest["encodings"]["<R>"]``:

  - ``{"codec": "raw", "compression": C}``: Parquet ``fixed_size_binary(3*R*R)`` holding the uint8
    pixels in CHW order (planar RGB), with Parquet column compression C (``none``/``lz4``/``zstd``).
    A column chunk is one contiguous buffer, so decoding is ``np.frombuffer(...).reshape(n, 3, R, R)``.
  - ``{"codec": "png"}``: Parquet ``binary`` holding a PNG (RGB, 8 bit) per image.

* ``label_<name>`` (optional): int32 class index for categorical labels, float32 for continuous
  ones; ``manifest["labels"]`` lists them with their kind.

Each level below the top is made from the level above by 2x2 box filtering in float32, rounded to
nearest (ties to even) only when stored -- as in the official StyleGAN ``dataset_tool.py``. Because the
float values are carried between levels, every level equals the exact mean over its 2^k x 2^k block of
the top-level pixels, rounded (float32 is exact here: the values are multiples of 4^-k below 256).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "stylegan_dist.image_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
LABEL_PREFIX = "label_"

# Default per-resolution encoding, chosen by measurement (see data_pipeline/README.md, "Format"):
# raw CHW uint8 everywhere, uncompressed. PNG is 2-3x smaller on photographs but decodes at ~13 MB/s
# of pixels per core (1024: ~60 img/s/core), far below the streaming target; zstd on raw pixels saves
# only ~10-25% on photographs and costs decode time. ``--encoding`` overrides per level.
DEFAULT_ENCODING: dict[str, Any] = {"codec": "raw", "compression": "none"}
CODECS = ("raw", "png")
RAW_COMPRESSIONS = ("none", "lz4", "zstd", "snappy", "gzip")


class DatasetError(Exception):
    """A user-facing problem with a dataset or its inputs; the message is one clear sentence."""


def column_name(resolution: int) -> str:
    return f"res{int(resolution)}"


def label_column(name: str) -> str:
    return LABEL_PREFIX + name


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def resolution_levels(resolution: int, min_resolution: int = 4) -> list[int]:
    """All powers of two from ``min_resolution`` up to ``resolution`` (ascending)."""
    if not is_power_of_two(resolution) or resolution < 4:
        raise DatasetError(f"--resolution must be a power of two >= 4, got {resolution}.")
    if not is_power_of_two(min_resolution) or min_resolution < 1 or min_resolution > resolution:
        raise DatasetError(f"--min-resolution must be a power of two <= {resolution}, got {min_resolution}.")
    levels = []
    r = min_resolution
    while r <= resolution:
        levels.append(r)
        r *= 2
    return levels


# --------------------------------------------------------------------------------------------- pyramid


def box_pyramid(image: np.ndarray, levels: Iterable[int]) -> dict[int, np.ndarray]:
    """Build every level of ``levels`` from an HWC uint8 square image whose side is ``max(levels)``.

    Returns ``{R: HWC uint8 array}``. Lower levels are 2x2 box averages of the float level above,
    rounded with ``np.rint`` and clipped, exactly like the official StyleGAN dataset tool.
    """
    levels = sorted(levels, reverse=True)
    top = levels[0]
    if image.shape != (top, top, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected ({top}, {top}, 3) uint8, got {image.shape} {image.dtype}")
    out = {top: image}
    x = None
    r = top
    for level in levels[1:]:
        if x is None:
            x = image.astype(np.float32)
        while r > level:
            x = (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]) * np.float32(0.25)
            r //= 2
        out[level] = np.rint(x).clip(0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------- encodings


def normalize_encoding(spec: dict[str, Any] | None) -> dict[str, Any]:
    spec = dict(DEFAULT_ENCODING if spec is None else spec)
    codec = spec.get("codec")
    if codec == "raw":
        comp = spec.get("compression", "none")
        if comp not in RAW_COMPRESSIONS:
            raise DatasetError(f"Unknown raw compression {comp!r}; use one of {', '.join(RAW_COMPRESSIONS)}.")
        return {"codec": "raw", "compression": comp, "layout": "CHW"}
    if codec == "png":
        return {"codec": "png", "compress_level": int(spec.get("compress_level", 1))}
    raise DatasetError(f"Unknown image codec {codec!r}; use one of {', '.join(CODECS)}.")


def parse_encoding_option(text: str, levels: list[int]) -> dict[int, dict[str, Any]]:
    """Parse ``--encoding``: ``raw``, ``raw-zstd``, ``png`` or per level ``512=png,1024=png,*=raw``."""

    def one(token: str) -> dict[str, Any]:
        token = token.strip().lower()
        if token == "png":
            return normalize_encoding({"codec": "png"})
        if token == "raw":
            return normalize_encoding({"codec": "raw", "compression": "none"})
        if token.startswith("raw-"):
            return normalize_encoding({"codec": "raw", "compression": token[4:]})
        raise DatasetError(f"Unknown encoding {token!r}; use raw, raw-lz4, raw-zstd or png.")

    result = {r: normalize_encoding(None) for r in levels}
    for part in [p for p in text.split(",") if p.strip()]:
        if "=" in part:
            key, value = part.split("=", 1)
            key = key.strip()
            if key == "*":
                enc = one(value)
                result = {r: enc for r in levels}
                continue
            try:
                r = int(key)
            except ValueError:
                raise DatasetError(f"Bad --encoding entry {part!r}; expected RES=CODEC, e.g. 1024=png.") from None
            if r not in result:
                raise DatasetError(f"--encoding names resolution {r}, which is not one of {levels}.")
            result[r] = one(value)
        else:
            enc = one(part)
            result = {r: enc for r in levels}
    return result


def encode_image(chw_or_hwc: np.ndarray, encoding: dict[str, Any], *, hwc: bool) -> bytes:
    """Encode one uint8 image (given as HWC if ``hwc`` else CHW) for its column."""
    if encoding["codec"] == "raw":
        chw = np.ascontiguousarray(chw_or_hwc.transpose(2, 0, 1)) if hwc else np.ascontiguousarray(chw_or_hwc)
        return chw.tobytes()
    from PIL import Image

    arr = chw_or_hwc if hwc else chw_or_hwc.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, "PNG", compress_level=encoding.get("compress_level", 1))
    return buf.getvalue()


def decode_column(column, resolution: int, encoding: dict[str, Any]) -> np.ndarray:
    """Decode a pyarrow (Chunked)Array of one resolution column to an ``[n, 3, R, R]`` uint8 array.

    For ``raw`` with a single chunk the result is a zero-copy, read-only view of the Arrow buffer
    (callers that write into it must copy); several chunks are copied once into a new array.
    """
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    n = sum(len(c) for c in chunks)
    if encoding["codec"] == "raw":
        views = [_raw_chunk_view(c, resolution) for c in chunks if len(c)]
        if len(views) == 1:
            return views[0]
        out = np.empty((n, 3, resolution, resolution), np.uint8)
        i = 0
        for v in views:
            out[i : i + len(v)] = v
            i += len(v)
        return out
    from PIL import Image

    out = np.empty((n, 3, resolution, resolution), np.uint8)
    i = 0
    for c in chunks:
        for value in c.to_pylist():
            with Image.open(io.BytesIO(value)) as im:
                out[i] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            i += 1
    return out


def _raw_chunk_view(chunk, resolution: int) -> np.ndarray:
    n = len(chunk)
    width = 3 * resolution * resolution
    if chunk.null_count:
        raise DatasetError("A shard holds a missing image; the dataset is damaged, run prepare again.")
    if chunk.type.byte_width != width:
        raise DatasetError(f"Column of resolution {resolution} holds values of {chunk.type.byte_width} bytes.")
    arr = np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=(chunk.offset + n) * width)
    return arr[chunk.offset * width :].reshape(n, 3, resolution, resolution)


def arrow_type(resolution: int, encoding: dict[str, Any]):
    import pyarrow as pa

    if encoding["codec"] == "raw":
        return pa.binary(3 * resolution * resolution)
    return pa.binary()


def parquet_compression(encoding: dict[str, Any]) -> str:
    if encoding["codec"] == "raw":
        return encoding["compression"]
    return "none"


# ------------------------------------------------------------------------------------ files, manifest


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path.tmp``, fsync, then ``os.replace`` so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


REQUIRED_KEYS = ("format_version", "resolutions", "num_images", "shards", "encodings")


def open_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``root/manifest.json`` (a local directory or a storage URI such as ``s3://bucket/data``);
    raise :class:`DatasetError` with one sentence if unusable."""
    from stylegan_dist import storage

    try:
        root = storage.resolve(root)
        if storage.is_uri(root):
            storage.check_location(root, what="dataset")
        if not storage.exists(root):
            raise DatasetError(f"Dataset directory {root} does not exist.")
        if storage.is_file(root):
            raise DatasetError(f"Dataset path {root} is not a directory.")
        path = storage.join(root, MANIFEST_NAME)
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            partial = storage.exists(storage.join(root, ".prepare-state.json"))
            hint = " (preparation was interrupted; run the same command again to finish it)" if partial else ""
            raise DatasetError(f"{root} has no {MANIFEST_NAME}, so it is not a prepared dataset{hint}.") from None
    except storage.StorageError as e:
        raise DatasetError(str(e)) from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{path} cannot be read as JSON ({exc}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a {FORMAT_NAME} manifest.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(
            f"{path} has format version {version!r} but this code reads version {FORMAT_VERSION}; prepare it again."
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DatasetError(f"{path} lacks the keys {', '.join(missing)}.")
    resolutions = manifest["resolutions"]
    if not resolutions or sorted(resolutions) != resolutions:
        raise DatasetError(f"{path} lists no resolutions or lists them out of order.")
    present = set(storage.list_dir(root)) if storage.is_uri(root) else None
    for shard in manifest["shards"]:
        found = shard["file"] in present if present is not None and "/" not in shard["file"] else \
            storage.exists(storage.join(root, shard["file"]))
        if not found:
            raise DatasetError(f"Shard {shard['file']} listed in {path} is missing.")
    total = sum(int(s["rows"]) for s in manifest["shards"])
    if total != manifest["num_images"]:
        raise DatasetError(f"{path} says {manifest['num_images']} images but its shards hold {total}.")
    manifest["encodings"] = {str(k): normalize_encoding(v) for k, v in manifest["encodings"].items()}
    return manifest


def encoding_for(manifest: dict[str, Any], resolution: int) -> dict[str, Any]:
    if resolution not in manifest["resolutions"]:
        raise DatasetError(
            f"Resolution {resolution} is not in this dataset; it has {', '.join(map(str, manifest['resolutions']))}."
        )
    return manifest["encodings"][str(resolution)]
