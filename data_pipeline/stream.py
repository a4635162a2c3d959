"""Streaming a prepared dataset into training: single process (``LocalBatchSource``) or Ray Data
(``make_ray_datasets`` + ``RayBatchSource`` inside Ray Train workers).

Both yield contiguous uint8 NCHW torch tensors ``[batch, 3, R, R]`` read from the ``res<R>`` column
only; the training loop converts to float on its device.

Order of ``LocalBatchSource`` (deterministic from ``seed`` and the epoch, independent of the resolution,
so switching resolution mid-epoch neither repeats nor skips images):

1. the dataset's blocks (Parquet row groups, 8..256 consecutive images) are permuted;
2. consecutive runs of ``shuffle_blocks`` blocks form windows, and the images of each window are
   permuted uniformly (a window is the unit of memory: at most ~2 windows of the current resolution are
   held decoded, e.g. 16 x 8 images = 400 MB at 1024, 16 x 256 images = 200 MB at 32);
3. rank ``r`` of ``world_size`` takes positions ``[r*L, (r+1)*L)`` of that sequence, ``L = N // world_size``,
   so the ranks' parts are disjoint, equally long, and each rank reads about 1/world_size of the data;
4. each image is mirrored with probability 0.5, drawn per (seed, epoch, position).

When the dataset has at most ``shuffle_blocks`` blocks (all small datasets) step 2 is a uniform shuffle.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from stylegan_dist import storage

from .format import (
    DatasetError,
    column_name,
    decode_column,
    encoding_for,
    label_column,
    open_manifest,
)

__all__ = [
    "DatasetError",
    "LocalBatchSource",
    "RayBatchSource",
    "iter_images",
    "make_ray_datasets",
    "open_manifest",
    "read_labels",
]

STATE_VERSION = 1


def _shard_paths(root: str, manifest: dict[str, Any]) -> list[str]:
    """Shard locations (local paths or storage URIs)."""
    return [storage.join(root, s["file"]) for s in manifest["shards"]]


def _parquet(loc: str):
    """A ParquetFile on a local file (memory-mapped) or an object in storage (ranged reads)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(storage.open_input_file(loc, memory_map=True))


def _read_table(loc: str, columns: list[str]):
    import pyarrow.parquet as pq

    return pq.read_table(storage.open_input_file(loc, memory_map=True), columns=columns)


class _Blocks:
    """Row groups of all shards, in dataset order, with their global row offsets."""

    def __init__(self, root: str, manifest: dict[str, Any]) -> None:
        self.files: list[str] = []
        self.block_file: list[int] = []
        self.block_group: list[int] = []
        sizes: list[int] = []
        for fi, path in enumerate(_shard_paths(root, manifest)):
            self.files.append(path)
            meta = _parquet(path).metadata
            for g in range(meta.num_row_groups):
                self.block_file.append(fi)
                self.block_group.append(g)
                sizes.append(meta.row_group(g).num_rows)
        self.sizes = np.asarray(sizes, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.num_rows = int(self.starts[-1])
        self.row_block = np.repeat(np.arange(len(sizes), dtype=np.int64), self.sizes)
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, block: int, columns: list[str]):
        fi = self.block_file[block]
        with self._lock:
            handle = self._handles.get(fi)
            if handle is None:
                handle = _parquet(self.files[fi])
                self._handles[fi] = handle
        return handle.read_row_group(self.block_group[block], columns=columns, use_threads=False)


class _EpochPlan:
    """The global image order of one epoch: ``rows[p]`` is the dataset row at sequence position p."""

    def __init__(self, blocks: _Blocks, seed: int, epoch: int, shuffle: bool, mirror: bool, window: int) -> None:
        n = blocks.num_rows
        rng = np.random.default_rng([int(seed), int(epoch), 0x51A7])
        order = rng.permutation(len(blocks)) if shuffle else np.arange(len(blocks))
        parts = []
        self.block_window = np.empty(len(blocks), np.int64)
        for w, lo in enumerate(range(0, len(order), window)):
            members = order[lo : lo + window]
            self.block_window[members] = w
            rows = np.concatenate([np.arange(blocks.starts[b], blocks.starts[b + 1]) for b in members])
            parts.append(rows[rng.permutation(len(rows))] if shuffle else rows)
        self.rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
        assert len(self.rows) == n
        if mirror:
            self.flips = np.random.default_rng([int(seed), int(epoch), 0xF11B]).random(n) < 0.5
        else:
            self.flips = np.zeros(n, bool)


class _BlockCache:
    """Decoded blocks of one resolution; blocks of windows already passed are dropped."""

    def __init__(self, blocks: _Blocks, resolution: int, encoding: dict[str, Any]) -> None:
        self.blocks = blocks
        self.resolution = resolution
        self.encoding = encoding
        self.column = column_name(resolution)
        self.data: dict[int, np.ndarray] = {}

    def get(self, block: int) -> np.ndarray:
        arr = self.data.get(block)
        if arr is None:
            table = self.blocks.read(block, [self.column])
            arr = decode_column(table.column(self.column), self.resolution, self.encoding)
            self.data[block] = arr
        return arr

    def drop_before(self, plan: _EpochPlan, window: int) -> None:
        for b in [b for b in self.data if plan.block_window[b] < window]:
            del self.data[b]


def _gather(cache: _BlockCache, blocks: _Blocks, rows: np.ndarray, flips: np.ndarray) -> np.ndarray:
    r = cache.resolution
    out = np.empty((len(rows), 3, r, r), np.uint8)
    row_block = blocks.row_block[rows]
    for b in np.unique(row_block):
        sel = np.nonzero(row_block == b)[0]
        arr = cache.get(int(b))
        local = rows[sel] - blocks.starts[b]
        out[sel] = arr[local]
    f = np.nonzero(flips)[0]
    if len(f):
        out[f] = out[f][..., ::-1]
    return out


class LocalBatchSource:
    """Single-process (no Ray) reader of a prepared dataset directory.

    ``batches(R, B)`` is an infinite iterator of contiguous uint8 tensors ``[B, 3, R, R]`` (drop-last),
    with a fresh deterministic shuffle each epoch and per-image mirroring. Calling ``batches()`` again
    (for instance with a new resolution) continues from the current position of the current epoch;
    only the newest iterator is live (older ones stop). ``state_dict()``/``load_state_dict()`` restore
    the exact position, so a resumed run sees bit-identical batches. A background thread prefetches
    ``prefetch`` batches; set ``prefetch=0`` to read synchronously.
    """

    def __init__(
        self,
        root,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mirror: bool = True,
        shuffle: bool = True,
        shuffle_blocks: int = 16,
        prefetch: int = 2,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"rank {rank} is not within world_size {world_size}.")
        self.root = storage.resolve(root)
        self.manifest = open_manifest(self.root)
        self.resolutions: list[int] = list(self.manifest["resolutions"])
        self.max_resolution: int = max(self.resolutions)
        self.num_images: int = int(self.manifest["num_images"])
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.mirror = bool(mirror)
        self.shuffle = bool(shuffle)
        self.shuffle_blocks = max(1, int(shuffle_blocks))
        self.prefetch = max(0, int(prefetch))
        self._blocks = _Blocks(self.root, self.manifest)
        if self._blocks.num_rows != self.num_images:
            raise DatasetError(
                f"{self.root}: the shards hold {self._blocks.num_rows} rows, manifest says {self.num_images}."
            )
        self.images_per_rank = self.num_images // self.world_size
        if self.images_per_rank == 0:
            raise DatasetError(f"{self.num_images} images cannot be split across {self.world_size} ranks.")
        self._epoch = 0
        self._position = 0  # images consumed by this rank in the current epoch
        self._plan: _EpochPlan | None = None
        self._plan_epoch = -1
        self._generation = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "local",
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_images": self.num_images,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "mirror": self.mirror,
            "shuffle_blocks": self.shuffle_blocks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The stored seed, shuffle, mirror and window settings are adopted so
        that the batches are identical to the run that saved the state; a different world size maps the
        position proportionally (same number of images seen globally) with a warning."""
        if state.get("num_images") != self.num_images:
            raise DatasetError(
                f"The saved data position is for a dataset of {state.get('num_images')} images, this one has "
                f"{self.num_images}."
            )
        self._generation += 1
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.mirror = bool(state["mirror"])
        self.shuffle_blocks = int(state.get("shuffle_blocks", self.shuffle_blocks))
        self._epoch = int(state["epoch"])
        position = int(state["position"])
        if int(state.get("world_size", self.world_size)) != self.world_size:
            warnings.warn(
                f"data state saved with world_size {state['world_size']}, resuming with {self.world_size}: "
                "the position is mapped approximately",
                stacklevel=2,
            )
            position = min(self.images_per_rank, position * int(state["world_size"]) // self.world_size)
        self._position = position
        self._plan = None
        self._plan_epoch = -1

    # ------------------------------------------------------------------------------------ order
    def _plan_for(self, epoch: int) -> _EpochPlan:
        with self._lock:
            if self._plan_epoch != epoch or self._plan is None:
                self._plan = _EpochPlan(self._blocks, self.seed, epoch, self.shuffle, self.mirror, self.shuffle_blocks)
                self._plan_epoch = epoch
            return self._plan

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Dataset rows this rank reads in ``epoch``, in order (for tests and diagnostics)."""
        lo = self.rank * self.images_per_rank
        return self._plan_for(epoch).rows[lo : lo + self.images_per_rank].copy()

    def _produce(self, resolution: int, batch_size: int, epoch: int, position: int):
        """Generator of (epoch_after, position_after, ids, images ndarray), starting at (epoch, position)."""
        encoding = encoding_for(self.manifest, resolution)
        cache = _BlockCache(self._blocks, resolution, encoding)
        lo_rank = self.rank * self.images_per_rank
        ids_col = None
        while True:
            if position + batch_size > self.images_per_rank:
                epoch, position = epoch + 1, 0
                cache.data.clear()
            plan = self._plan_for(epoch)
            a, b = lo_rank + position, lo_rank + position + batch_size
            rows = plan.rows[a:b]
            cache.drop_before(plan, int(plan.block_window[self._blocks.row_block[rows[0]]]))
            images = _gather(cache, self._blocks, rows, plan.flips[a:b])
            if ids_col is None:
                ids_col = self._ids()
            position += batch_size
            yield epoch, position, ids_col[rows], images

    def _ids(self) -> np.ndarray:
        if not hasattr(self, "_id_cache"):
            self._id_cache = _read_ids(self.root, self.manifest)
        return self._id_cache

    def batches(self, resolution: int, batch_size: int, *, with_ids: bool = False) -> Iterator[Any]:
        """Infinite iterator of uint8 ``[batch_size, 3, R, R]`` tensors (or ``(ids, images)`` pairs with
        ``with_ids=True``, ids as an int64 numpy array)."""
        encoding_for(self.manifest, resolution)  # validate now, not at first next()
        if batch_size < 1 or batch_size > self.images_per_rank:
            raise DatasetError(
                f"Batch size {batch_size} must be between 1 and the {self.images_per_rank} images of each rank."
            )
        self._generation += 1
        return self._iterate(resolution, batch_size, with_ids, self._generation)

    def _iterate(self, resolution: int, batch_size: int, with_ids: bool, generation: int):
        if self._position + batch_size > self.images_per_rank:
            self._epoch, self._position = self._epoch + 1, 0
        producer = self._produce(resolution, batch_size, self._epoch, self._position)
        if self.prefetch:
            producer = _Prefetcher(producer, self.prefetch)
        try:
            for epoch, position, ids, images in producer:
                if generation != self._generation:
                    return
                self._epoch, self._position = epoch, position
                tensor = torch.from_numpy(images)
                yield (ids, tensor) if with_ids else tensor
        finally:
            if isinstance(producer, _Prefetcher):
                producer.close()


class _Prefetcher:
    """Runs a generator in a daemon thread, ``depth`` items ahead. Pyarrow reads and numpy copies release
    the GIL, so reading overlaps with the training step."""

    _END = object()

    def __init__(self, gen, depth: int) -> None:
        self._gen = gen
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="data_pipeline-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer
            self._put(_Failure(exc))
        finally:
            self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


# ------------------------------------------------------------------------------- whole-dataset readers


def _read_ids(root: str, manifest: dict[str, Any]) -> np.ndarray:
    parts = [_read_table(p, ["id"]).column("id").to_numpy() for p in _shard_paths(root, manifest)]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def iter_images(root, resolution: int, batch_size: int, *, with_ids: bool = False) -> Iterator[Any]:
    """Every image exactly once, in id order, no shuffle, no mirror: uint8 ``[<=batch_size, 3, R, R]``
    tensors (the last one may be smaller). For FID real statistics."""
    root = storage.resolve(root)
    manifest = open_manifest(root)
    encoding = encoding_for(manifest, resolution)
    col = column_name(resolution)
    pending: list[np.ndarray] = []
    pending_ids: list[np.ndarray] = []
    count = 0

    def emit():
        nonlocal count
        images = np.concatenate(pending) if len(pending) > 1 else np.array(pending[0], copy=True)
        ids = np.concatenate(pending_ids)
        pending.clear()
        pending_ids.clear()
        count = 0
        t = torch.from_numpy(np.ascontiguousarray(images))
        return (ids, t) if with_ids else t

    for path in _shard_paths(root, manifest):
        f = _parquet(path)
        for g in range(f.metadata.num_row_groups):
            table = f.read_row_group(g, columns=["id", col], use_threads=False)
            arr = decode_column(table.column(col), resolution, encoding)
            ids = table.column("id").to_numpy()
            i = 0
            while i < len(arr):
                take = min(batch_size - count, len(arr) - i)
                pending.append(arr[i : i + take])
                pending_ids.append(ids[i : i + take])
                count += take
                i += take
                if count == batch_size:
                    yield emit()
    if count:
        yield emit()


def read_labels(root) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ids and ``{label name: values}`` in id order: int64 class indices for categorical labels,
    float32 for continuous ones (see ``open_manifest(root)["labels"]`` for kinds and class names)."""
    root = storage.resolve(root)
    manifest = open_manifest(root)
    names = [s["name"] for s in manifest.get("labels", [])]
    cols = ["id"] + [label_column(n) for n in names]
    ids_parts: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for path in _shard_paths(root, manifest):
        t = _read_table(path, cols)
        ids_parts.append(t.column("id").to_numpy())
        for n in names:
            parts[n].append(t.column(label_column(n)).to_numpy())
    ids = np.concatenate(ids_parts).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    out = {}
    for s in manifest.get("labels", []):
        v = np.concatenate(parts[s["name"]])[order]
        out[s["name"]] = v.astype(np.int64) if s["kind"] == "categorical" else v.astype(np.float32)
    return ids[order], out


# ------------------------------------------------------------------------------------------------ Ray


def make_ray_datasets(
    root,
    resolutions: list[int] | None = None,
    *,
    with_ids: bool = False,
    shuffle_files: bool = True,
    seed: int | None = 0,
) -> dict[str, Any]:
    """One Ray Data dataset per resolution, key ``f"res{R}"``, each reading only that column (plus
    ``id`` when ``with_ids``). File order is reshuffled each epoch (``FileShuffleConfig`` reseeded per
    execution). Pass the dict as ``TorchTrainer(datasets=...)``; Ray Train splits each one across the
    workers (``streaming_split(world_size, equal=True)``) and ``RayBatchSource`` reads the splits."""
    from ray.data.datasource.file_based_datasource import FileShuffleConfig

    root = storage.resolve(root)
    manifest = open_manifest(root)
    files = _shard_paths(root, manifest)
    levels = manifest["resolutions"] if resolutions is None else list(resolutions)
    out = {}
    for r in levels:
        encoding_for(manifest, r)
        cols = (["id"] if with_ids else []) + [column_name(r)]
        shuffle = FileShuffleConfig(seed=seed) if shuffle_files else None
        out[f"res{r}"] = _read_parquet_v1(files, cols, shuffle)
    return out


def _read_parquet_v1(files: list[str], columns: list[str], shuffle) -> Any:
    """``ray.data.read_parquet`` through the classic Parquet datasource: on Ray 2.60 the V2 datasource
    adds a ListFiles stage that costs ~3-5 s at the start of every epoch here, against ~0.4 s (measured
    with data_pipeline.bench); projection to ``columns`` works the same in both."""
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = getattr(ctx, "use_datasource_v2", None)
    # Local files: a LocalFileSystem with memory-mapped reads lets uncompressed raw pixel columns come straight
    # from the page cache instead of being copied into a read buffer first (+10-80% at 256 px here). Object
    # storage: the same S3/GCS filesystem as the rest of the product (endpoint, timeouts), paths inside it.
    fs, _ = storage.filesystem(files[0])
    files = [storage.filesystem(f)[1] for f in files]
    try:
        if previous is not None:
            ctx.use_datasource_v2 = False
        return ray.data.read_parquet(files, columns=columns, shuffle=shuffle, file_extensions=None, filesystem=fs)
    finally:
        if previous is not None:
            ctx.use_datasource_v2 = previous


class RayBatchSource:
    """``batches()`` like :class:`LocalBatchSource`, for use inside a Ray Train worker.

    Reads ``ray.train.get_dataset_shard(f"res{R}")`` (or ``dataset_shard_fn(name)``) of datasets made by
    :func:`make_ray_datasets`, taking Ray Data's blocks as they come (no re-batching copy in Ray). Each
    pass over the split is one epoch: Ray Data reshuffles the file order per epoch, and a shuffle buffer
    of about ``shuffle_buffer_mb`` MB of decoded images (at least 4 batches, at most ``shuffle_buffer``
    images) is sampled without replacement to form each batch. Gathering a batch from the buffer and
    mirroring is the single copy from Ray's object store into the writable torch tensor, so the shuffle
    costs no extra pass over the pixels. Randomness comes from ``(seed, rank, epoch, resolution)``.

    Resume is approximate: ``state_dict()`` holds the epoch and the images seen; after
    ``load_state_dict()`` iteration starts at the next epoch boundary (Ray Data cannot seek inside an
    epoch). A new ``batches()`` call at the same resolution (e.g. another batch size) continues the
    current epoch; one with another resolution starts a fresh epoch of that resolution's split. Only the
    newest iterator is live; ``close()`` releases Ray's iterator.
    """

    def __init__(
        self,
        root,
        *,
        seed: int = 0,
        mirror: bool = True,
        dataset_shard_fn: Callable[[str], Any] | None = None,
        shuffle_buffer: int | None = 4096,
        shuffle_buffer_mb: float = 512.0,
        prefetch_batches: int = 2,
        rank: int | None = None,
    ) -> None:
        self.root = storage.resolve(root)
        self.manifest = open_manifest(self.root)
        self.resolutions: list[int] = list(self.manifest["resolutions"])
        self.max_resolution: int = max(self.resolutions)
        self.num_images: int = int(self.manifest["num_images"])
        self.seed = int(seed)
        self.mirror = bool(mirror)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_buffer_mb = float(shuffle_buffer_mb)
        self.prefetch_batches = prefetch_batches
        if dataset_shard_fn is None:
            import ray.train

            dataset_shard_fn = ray.train.get_dataset_shard
        self._shard_fn = dataset_shard_fn
        if rank is None:
            try:
                import ray.train

                rank = ray.train.get_context().get_world_rank()
            except Exception:
                rank = 0
        self.rank = int(rank)
        self._epoch = 0
        self._epoch_seen = 0
        self._images_seen = 0
        self._generation = 0
        self._stream: _RayEpoch | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "ray",
            "epoch": self._epoch,
            "epoch_images_seen": self._epoch_seen,
            "images_seen": self._images_seen,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generation += 1
        self.close()
        self.seed = int(state.get("seed", self.seed))
        self._images_seen = int(state.get("images_seen", 0))
        # An epoch interrupted part-way is not resumed mid-way: iteration starts with the next one.
        self._epoch = int(state.get("epoch", 0)) + (1 if state.get("epoch_images_seen", 0) else 0)
        self._epoch_seen = 0

    def buffer_images(self, resolution: int, batch_size: int) -> int:
        """Images held in the shuffle buffer at this resolution (0: no shuffling beyond file order)."""
        if not self.shuffle_buffer:
            return 0
        by_mb = int(self.shuffle_buffer_mb * 1e6 // (3 * resolution * resolution))
        return max(4 * batch_size, min(int(self.shuffle_buffer), by_mb))

    def batches(self, resolution: int, batch_size: int, *, with_ids: bool = False) -> Iterator[Any]:
        encoding = encoding_for(self.manifest, resolution)
        if batch_size < 1:
            raise DatasetError(f"Batch size must be at least 1, got {batch_size}.")
        self._generation += 1
        return self._iterate(resolution, batch_size, with_ids, encoding, self._generation)

    def _open_epoch(self, resolution: int, with_ids: bool) -> _RayEpoch:
        it = self._shard_fn(f"res{resolution}")
        if it is None:
            raise DatasetError(f"No Ray dataset named res{resolution} was given to the trainer.")
        rng = np.random.default_rng([self.seed, self.rank, self._epoch, resolution])
        batch_iter = iter(
            it.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch_batches)
        )
        return _RayEpoch(self._epoch, resolution, with_ids, batch_iter, _SamplePool(rng), rng)

    def _iterate(self, resolution, batch_size, with_ids, encoding, generation):
        col = column_name(resolution)
        stream = self._stream
        if stream is not None and (stream.resolution != resolution or stream.with_ids != with_ids):
            stream.close()  # another resolution: that split's epoch is abandoned, the new one starts fresh
            stream = self._stream = None
            if self._epoch_seen:
                self._epoch, self._epoch_seen = self._epoch + 1, 0
        buffer = self.buffer_images(resolution, batch_size)
        while True:
            if generation != self._generation:
                return
            if stream is None:
                stream = self._stream = self._open_epoch(resolution, with_ids)
            pool, rng = stream.pool, stream.rng
            if not buffer:
                pool.rng = None
            while not stream.exhausted and pool.size < max(buffer, batch_size):
                try:
                    table = next(stream.batch_iter)
                except StopIteration:
                    stream.exhausted = True
                    break
                if table.num_rows:
                    arr = decode_column(table.column(col), resolution, encoding)
                    pool.add(arr, table.column("id").to_numpy() if with_ids else None)
            if pool.size < batch_size:  # end of the epoch (drop-last)
                if stream.produced == 0:
                    raise DatasetError(f"The Ray dataset res{resolution} yielded no full batch of {batch_size} images.")
                stream.close()
                stream = self._stream = None
                self._epoch, self._epoch_seen = self._epoch + 1, 0
                continue
            flips = rng.random(batch_size) < 0.5 if self.mirror else np.zeros(batch_size, bool)
            images, ids = pool.take(batch_size, flips)
            stream.produced += batch_size
            self._epoch_seen += batch_size
            self._images_seen += batch_size
            tensor = torch.from_numpy(images)
            yield (ids, tensor) if with_ids else tensor

    def close(self) -> None:
        """Stop reading (releases Ray Data's iterator threads)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class _RayEpoch:
    """The live pass over one resolution's split: Ray's block iterator and the shuffle pool. Kept across
    ``batches()`` calls at the same resolution (e.g. a new batch size), so the epoch continues."""

    def __init__(self, epoch, resolution, with_ids, batch_iter, pool, rng) -> None:
        self.epoch = epoch
        self.resolution = resolution
        self.with_ids = with_ids
        self.batch_iter = batch_iter
        self.pool = pool
        self.rng = rng
        self.exhausted = False
        self.produced = 0

    def close(self) -> None:
        close = getattr(self.batch_iter, "close", None)
        if close is not None:
            close()


class _SamplePool:
    """Decoded blocks (read-only views into Ray's object store) from which batches are drawn at random
    without replacement (or in arrival order when ``rng`` is None); a block is released once all its
    images have been taken."""

    def __init__(self, rng: np.random.Generator | None) -> None:
        self.rng = rng
        self.blocks: dict[int, list] = {}
        self.refs = np.empty((0, 2), np.int64)  # (block, row) of every image not yet taken
        self._next = 0

    @property
    def size(self) -> int:
        return len(self.refs)

    def add(self, images: np.ndarray, ids: np.ndarray | None) -> None:
        b = self._next
        self._next += 1
        self.blocks[b] = [images, ids, len(images)]
        new = np.stack([np.full(len(images), b, np.int64), np.arange(len(images), dtype=np.int64)], axis=1)
        self.refs = np.concatenate([self.refs, new])

    def take(self, n: int, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.rng is None:
            pick = np.arange(n)
        else:
            pick = self.rng.choice(len(self.refs), size=n, replace=False)
        chosen = self.refs[pick]
        keep = np.ones(len(self.refs), bool)
        keep[pick] = False
        self.refs = self.refs[keep]
        first = self.blocks[int(chosen[0, 0])][0]
        out = np.empty((n, *first.shape[1:]), np.uint8)
        ids = np.empty(n, np.int64)
        for j, (b, r) in enumerate(chosen.tolist()):
            entry = self.blocks[b]
            out[j] = entry[0][r, :, :, ::-1] if flips[j] else entry[0][r]
            if entry[1] is not None:
                ids[j] = entry[1][r]
            entry[2] -= 1
            if entry[2] == 0:
                del self.blocks[b]
        return out, ids


def default_ray_init_kwargs() -> dict[str, Any]:
    """Arguments for ``ray.init`` that work on small machines (at least 4 logical CPUs, no dashboard)."""
    return {
        "num_cpus": max(4, os.cpu_count() or 1),
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": dict(MALLOC_ENV)},
    }


# glibc malloc settings for processes that allocate and free many large buffers (Ray Data read tasks,
# the batch consumer): keep freed memory in the heap instead of returning it to the OS, so the next
# block does not page-fault fresh memory in. Measured +5-25% Ray Data throughput at 256 px on the 2-core
# dev VM (data_pipeline/README.md). Harmless elsewhere; ignored by non-glibc allocators.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(8 << 30), "MALLOC_TOP_PAD_": str(256 << 20)}


def tune_malloc() -> bool:
    """Apply ``MALLOC_ENV`` to the current process through ``mallopt`` (glibc only); returns success."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad = -1, -2
    ok = mallopt(m_trim_threshold, ctypes.c_int(min(int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]), 2**31 - 1)))
    ok &= mallopt(m_top_pad, ctypes.c_int(int(MALLOC_ENV["MALLOC_TOP_PAD_"])))
    return bool(ok)
