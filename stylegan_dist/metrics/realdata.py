"""Reading real images for metrics: a contiguous slice of the first N images of a prepared dataset.

Only the Parquet row groups that overlap the slice are read, so each worker reads about 1/world_size of
the data (``data_pipeline.stream.iter_images`` reads everything, which is the right tool for one process
but not for W workers that each need their part).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import storage
from .registry import MetricError


def open_dataset(root: str | Path) -> dict[str, Any]:
    from data_pipeline.format import DatasetError, open_manifest

    try:
        return open_manifest(root)
    except DatasetError as e:
        raise MetricError(str(e)) from None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Content identity of a dataset: shard checksums, row counts, resolutions (not timestamps or paths)."""
    ident = {
        "fingerprint": manifest.get("fingerprint"),
        "num_images": manifest.get("num_images"),
        "resolutions": manifest.get("resolutions"),
        "encodings": manifest.get("encodings"),
        "shards": [[s.get("rows"), s.get("sha256")] for s in manifest.get("shards", [])],
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def rank_range(num: int, rank: int, world_size: int) -> tuple[int, int]:
    return num * rank // world_size, num * (rank + 1) // world_size


def iter_real_slice(root: str | Path, manifest: dict[str, Any], resolution: int, batch_size: int,
                    start: int, stop: int) -> Iterator[torch.Tensor]:
    """uint8 [<=batch_size, C, R, R] batches of dataset rows [start, stop) in dataset (id) order."""
    import pyarrow.parquet as pq

    from data_pipeline.format import column_name, decode_column, encoding_for

    if resolution not in manifest["resolutions"]:
        raise MetricError(f"Dataset {root} has no images at {resolution}x{resolution} (it has "
                          f"{', '.join(map(str, manifest['resolutions']))}); FID compares at the generator's "
                          f"current resolution.")
    encoding = encoding_for(manifest, resolution)
    col = column_name(resolution)
    pending: list[np.ndarray] = []
    have = 0
    row = 0
    for shard in manifest["shards"]:
        if row >= stop:
            break
        f = pq.ParquetFile(storage.open_input_file(storage.join(storage.resolve(root), shard["file"]),
                                                   memory_map=True))
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            lo, hi = max(start, row), min(stop, row + n)
            if lo < hi:
                arr = decode_column(f.read_row_group(g, columns=[col]).column(col), resolution, encoding)
                part = arr[lo - row:hi - row]
                while len(part):
                    take = min(batch_size - have, len(part))
                    pending.append(part[:take])
                    have += take
                    part = part[take:]
                    if have == batch_size:
                        yield torch.from_numpy(np.ascontiguousarray(np.concatenate(pending)))
                        pending, have = [], 0
            row += n
            if row >= stop:
                break
    if have:
        yield torch.from_numpy(np.ascontiguousarray(np.concatenate(pending)))
