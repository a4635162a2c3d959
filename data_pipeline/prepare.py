"""Turn a folder or zip of images into Parquet shards with every power-of-two resolution.

    python -m data_pipeline.prepare SOURCE OUT --resolution R [options]

See ``python -m data_pipeline.prepare --help`` and data_pipeline/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zipfile
from typing import Any

import numpy as np

from .builder import BuildConfig, HelpFormatter, build, cli_main
from .format import parse_encoding_option, resolution_levels
from .images import (
    RESIZE_FILTER,
    SkipImage,
    build_label_spec,
    decode_image,
    encode_labels,
    list_source,
    match_labels,
    read_label_file,
)


class FileSource:
    """Images of a folder or zip, in sorted path order; the id of a file is its index in that order."""

    def __init__(
        self,
        listing,
        resolution: int,
        *,
        no_resize: bool = False,
        labels: list[dict[str, Any] | None] | None = None,
        labels_path: str | None = None,
        labels_digest: str | None = None,
    ) -> None:
        self.listing = listing
        self.resolution = resolution
        self.no_resize = no_resize
        self.labels = labels
        self.labels_path = labels_path
        self.labels_digest = labels_digest
        self.num_items = len(listing.files)
        self._zip: zipfile.ZipFile | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state

    def open(self) -> None:
        if self.listing.kind == "zip" and self._zip is None:
            self._zip = zipfile.ZipFile(self.listing.source)

    def path(self, index: int) -> str:
        return self.listing.files[index]

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any], bool]:
        labels = {}
        if self.labels is not None:
            labels = self.labels[index]
            if labels is None:
                raise SkipImage("no label in the label file")
        try:
            data = self.listing.read_bytes(index, self._zip)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise SkipImage(f"cannot read file ({exc})") from None
        image, resized = decode_image(data, self.resolution, no_resize=self.no_resize)
        return image, labels, resized

    def fingerprint(self) -> dict[str, Any]:
        h = hashlib.sha256()
        for f, s, m in zip(self.listing.files, self.listing.sizes, self.listing.mtimes):
            h.update(f"{f}\0{s}\0{m}\n".encode())
        return {
            "kind": self.listing.kind,
            "path": self.listing.source,
            "files": h.hexdigest(),
            "no_resize": self.no_resize,
            "filter": RESIZE_FILTER,
            "labels": self.labels_digest,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.listing.kind,
            "path": self.listing.source,
            "num_files": self.num_items,
            "num_ignored_non_images": self.listing.ignored,
            "resize": "off (--no-resize)" if self.no_resize else f"centre crop to square, then {RESIZE_FILTER}",
            "labels_file": self.labels_path,
        }


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.prepare",
        description=(
            "Turn a folder (searched recursively) or zip of images into Parquet shards holding every "
            "power-of-two resolution from --min-resolution up to --resolution (2x2 box-filtered, as in the "
            "official StyleGAN dataset tool), plus OUT/manifest.json. Re-running the same command after an "
            "interruption finishes the job without redoing finished shards."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="folder of images (searched recursively) or a .zip of images; "
                   "FFHQ's images1024x1024/NNNNN/NNNNN.png layout works as is")  # fmt: skip
    p.add_argument("out", metavar="OUT", help="output directory (created if missing)")
    p.add_argument("--resolution", "-r", type=int, required=True,
                   help="top resolution R (power of two); square RxR images are used as they are")  # fmt: skip
    p.add_argument("--min-resolution", type=int, default=4, help="lowest level stored (4 or 8)")
    p.add_argument("--no-resize", action="store_true",
                   help="reject (skip) images that are not exactly RxR instead of centre-cropping them to a "
                   "square and resizing with the Lanczos filter")  # fmt: skip
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="CSV (header row; image column path/file/filename/image/name or the first column) or "
                   "JSON ({'labels': [[path, value], ...]}, {path: {name: value}}, ...) of per-image labels; "
                   "keys may be paths relative to SOURCE, file names or stems")  # fmt: skip
    p.add_argument("--encoding", default="raw",
                   help="per-resolution encoding: raw (uncompressed CHW uint8, fastest), raw-lz4, raw-zstd, png, "
                   "or per level, e.g. '1024=png,512=png' (see README for measured sizes and speeds)")  # fmt: skip
    p.add_argument("--workers", "-j", type=_positive_int, default=os.cpu_count() or 1,
                   help="worker processes (all cores by default)")  # fmt: skip
    p.add_argument(
        "--shard-size",
        type=_positive_int,
        default=None,
        help="inputs per shard (default: about 512 MB of pixels, at least 16 shards for big inputs)",
    )
    p.add_argument(
        "--rows-per-group",
        type=_positive_int,
        default=None,
        help="rows per Parquet row group (default: about 32 MiB at the top resolution, 8..256)",
    )
    p.add_argument("--strict", action="store_true", help="make any skipped (unusable) input an error")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset made with other inputs or settings already in OUT")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return p


def run(argv: list[str] | None = None, *, stop_after_shards: int | None = None) -> dict[str, Any]:
    args = make_parser().parse_args(argv)
    levels = resolution_levels(args.resolution, args.min_resolution)
    if args.min_resolution not in (4, 8) and not args.quiet:
        print(f"[prepare] note: --min-resolution {args.min_resolution} (usually 4 or 8)", file=sys.stderr)
    encodings = parse_encoding_option(args.encoding, levels)
    listing = list_source(args.source)
    labels = spec = digest = None
    if args.labels:
        table = read_label_file(args.labels)
        spec = build_label_spec(table)
        matched = match_labels(listing.files, table)
        labels = [encode_labels(m, spec) if m is not None else None for m in matched]
        with open(args.labels, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    source = FileSource(
        listing, args.resolution, no_resize=args.no_resize, labels=labels, labels_path=args.labels,
        labels_digest=digest,
    )  # fmt: skip
    cfg = BuildConfig(
        out=args.out,
        source=source,
        levels=levels,
        encodings=encodings,
        label_spec=spec or [],
        shard_size=args.shard_size or 0,
        rows_per_group=args.rows_per_group or 0,
        workers=args.workers,
        strict=args.strict,
        overwrite=args.overwrite,
        quiet=args.quiet,
        tool="prepare",
        extra_manifest={"resize_filter": RESIZE_FILTER, "no_resize": bool(args.no_resize)},
        stop_after_shards=stop_after_shards,
    )
    return build(cfg)


def main(argv: list[str] | None = None) -> int:
    return cli_main("prepare", run, argv)


if __name__ == "__main__":
    sys.exit(main())
