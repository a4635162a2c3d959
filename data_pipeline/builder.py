"""Shared engine of ``prepare`` and ``synthetic``: parallel, resumable, atomic shard writing.

Work is split into shards of consecutive *input* indices (``shard_size`` inputs each, fixed by the
settings, never by the number of workers). Each worker process builds whole shards: it loads its inputs,
builds the box-filter pyramid, encodes every level, writes ``shard-NNNNN.parquet.tmp`` row group by row
group, fsyncs, hashes and ``os.replace``-s it into place. The parent records every finished shard in
``OUT/.prepare-state.json`` (atomically). A re-run with the same settings skips the recorded shards whose
file is still there with the recorded size, deletes stray ``.tmp`` files and builds the rest, so the
result is byte-identical to one clean run and has no duplicate rows. ``manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_DIR,
    DatasetError,
    arrow_type,
    atomic_write_json,
    box_pyramid,
    column_name,
    encode_image,
    label_column,
    parquet_compression,
    sha256_file,
)
from .images import SkipImage

STATE_NAME = ".prepare-state.json"


class ItemSource(Protocol):
    """What the builder needs from an input: picklable, opened once per worker process."""

    num_items: int

    def open(self) -> None: ...

    def path(self, index: int) -> str: ...

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any], bool]:
        """-> (HWC uint8 image of the top resolution, encoded labels, was resized). Raises SkipImage."""
        ...

    def fingerprint(self) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class BuildConfig:
    out: str
    source: Any  # ItemSource
    levels: list[int]
    encodings: dict[int, dict[str, Any]]
    label_spec: list[dict[str, Any]] = field(default_factory=list)
    shard_size: int = 0  # inputs per shard; 0 = automatic
    rows_per_group: int = 0  # rows per Parquet row group; 0 = automatic
    workers: int = 0  # 0 = os.cpu_count()
    strict: bool = False
    overwrite: bool = False
    quiet: bool = False
    progress_interval: float = 3.0
    tool: str = "prepare"
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    stop_after_shards: int | None = None  # testing hook: behave as if interrupted after this many shards


def raw_bytes_per_image(levels: list[int]) -> int:
    return sum(3 * r * r for r in levels)


def auto_rows_per_group(top: int) -> int:
    """Rows per Parquet row group: about 32 MiB of the top resolution, a power of two in [8, 256]."""
    rows = (32 << 20) // (3 * top * top)
    rows = 1 << max(0, int(math.floor(math.log2(max(rows, 1)))))
    return int(min(256, max(8, rows)))


def auto_shard_size(num_items: int, levels: list[int], rows_per_group: int) -> int:
    """Inputs per shard: about 512 MiB of raw pixels, a multiple of ``rows_per_group``, and at least 16
    shards when the dataset is large enough that this keeps shards >= one row group."""
    per_image = raw_bytes_per_image(levels)
    by_bytes = max(rows_per_group, ((512 << 20) // per_image) // rows_per_group * rows_per_group)
    for_parallelism = max(rows_per_group, math.ceil(math.ceil(num_items / 16) / rows_per_group) * rows_per_group)
    return int(min(by_bytes, for_parallelism, 8192))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} TB"


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# ------------------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: BuildConfig, counter) -> None:
    cfg.source.open()
    _WORKER["cfg"] = cfg
    _WORKER["counter"] = counter


def _schema(cfg: BuildConfig):
    import pyarrow as pa

    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("path", pa.string(), nullable=False)]
    for r in cfg.levels:
        fields.append(pa.field(column_name(r), arrow_type(r, cfg.encodings[r]), nullable=False))
    for s in cfg.label_spec:
        typ = pa.int32() if s["kind"] == "categorical" else pa.float32()
        fields.append(pa.field(label_column(s["name"]), typ, nullable=False))
    return pa.schema(fields)


def shard_file(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.parquet"


def _build_shard(index: int, lo: int, hi: int, fingerprint: str) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg: BuildConfig = _WORKER["cfg"]
    counter = _WORKER["counter"]
    tick = _WORKER.get("tick")
    src = cfg.source
    schema = _schema(cfg).with_metadata(
        {"stylegan_dist": json.dumps({"shard": index, "inputs": [lo, hi], "fingerprint": fingerprint})}
    )
    final = Path(cfg.out) / shard_file(index)
    tmp = final.with_name(final.name + ".tmp")
    compression = {column_name(r): parquet_compression(cfg.encodings[r]) for r in cfg.levels}
    compression.update({"id": "none", "path": "zstd"})
    compression.update({label_column(s["name"]): "none" for s in cfg.label_spec})
    names = schema.names
    buf: dict[str, list] = {n: [] for n in names}
    rows = 0
    resized = 0
    skipped: list[dict[str, Any]] = []
    first_id = last_id = None
    writer = None

    def flush() -> None:
        nonlocal writer
        if not buf["id"]:
            return
        table = pa.Table.from_pydict({n: buf[n] for n in names}, schema=schema)
        if writer is None:
            writer = pq.ParquetWriter(
                tmp,
                schema,
                compression=compression,
                use_dictionary=False,
                write_statistics=["id"],
                data_page_size=1 << 20,
            )
        writer.write_table(table, row_group_size=cfg.rows_per_group)
        for n in names:
            buf[n].clear()

    try:
        for i in range(lo, hi):
            try:
                image, labels, was_resized = src.load(i)
            except SkipImage as exc:
                skipped.append({"path": src.path(i), "reason": str(exc)})
            else:
                pyramid = box_pyramid(image, cfg.levels)
                buf["id"].append(i)
                buf["path"].append(src.path(i))
                for r in cfg.levels:
                    buf[column_name(r)].append(encode_image(pyramid[r], cfg.encodings[r], hwc=True))
                for s in cfg.label_spec:
                    buf[label_column(s["name"])].append(labels[s["name"]])
                rows += 1
                resized += int(was_resized)
                first_id = i if first_id is None else first_id
                last_id = i
                if len(buf["id"]) >= cfg.rows_per_group:
                    flush()
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1
            if tick is not None:
                tick()
        flush()
        if writer is not None:
            writer.close()
            writer = None
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            size = tmp.stat().st_size
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        else:
            digest, size = None, 0
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return {
        "index": index,
        "file": shard_file(index) if rows else None,
        "rows": rows,
        "bytes": size,
        "sha256": digest,
        "first_id": first_id,
        "last_id": last_id,
        "inputs": [lo, hi],
        "resized": resized,
        "skipped": skipped,
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- parent side


def _log(cfg: BuildConfig, msg: str) -> None:
    if not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def _check_writable(out: Path) -> None:
    try:
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise DatasetError(f"Cannot create OUT {out}: permission denied.") from None
    except FileExistsError:
        raise DatasetError(f"OUT {out} exists and is not a directory.") from None
    except OSError as exc:
        raise DatasetError(f"Cannot create OUT {out} ({exc.strerror}).") from None
    probe = out / SHARD_DIR / ".write-test"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except PermissionError:
        raise DatasetError(f"OUT {out} is not writable: permission denied.") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DatasetError(f"Not enough disk space in OUT {out}: the device is full.") from None
        raise DatasetError(f"OUT {out} is not writable ({exc.strerror}).") from None


def _fingerprint(cfg: BuildConfig, shard_size: int, rows_per_group: int) -> str:
    data = {
        "format_version": FORMAT_VERSION,
        "levels": cfg.levels,
        "encodings": {str(k): v for k, v in cfg.encodings.items()},
        "labels": cfg.label_spec,
        "shard_size": shard_size,
        "rows_per_group": rows_per_group,
        "source": cfg.source.fingerprint(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _clear_outputs(out: Path) -> None:
    for p in (out / MANIFEST_NAME, out / STATE_NAME):
        if p.exists():
            p.unlink()
    shard_dir = out / SHARD_DIR
    if shard_dir.exists():
        for p in shard_dir.iterdir():
            if p.name.startswith("shard-"):
                p.unlink()


def _estimate_bytes_per_image(cfg: BuildConfig) -> float:
    total = 0.0
    for r in cfg.levels:
        raw = 3 * r * r
        enc = cfg.encodings[r]
        total += raw * (0.6 if enc["codec"] == "png" else 1.0) + 16
    return total + 64


def _strict_error(shard: dict[str, Any]) -> DatasetError:
    first = shard["skipped"][0]
    more = len(shard["skipped"]) - 1
    extra = f" (and {more} more in this shard)" if more else ""
    return DatasetError(f"--strict: input {first['path']} is unusable: {first['reason']}{extra}.")


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build (or finish building) the dataset in ``cfg.out``; returns the manifest."""
    out = Path(cfg.out)
    src = cfg.source
    n = src.num_items
    if n <= 0:
        raise DatasetError("There are no inputs to prepare.")
    rows_per_group = cfg.rows_per_group or auto_rows_per_group(max(cfg.levels))
    shard_size = cfg.shard_size or auto_shard_size(n, cfg.levels, rows_per_group)
    cfg.rows_per_group = rows_per_group
    cfg.shard_size = shard_size
    fingerprint = _fingerprint(cfg, shard_size, rows_per_group)
    _check_writable(out)
    lock = _lock_out(out)
    try:
        return _build_locked(cfg, out, src, n, rows_per_group, shard_size, fingerprint)
    finally:
        lock.close()


def _lock_out(out: Path):
    """An exclusive lock on OUT for the duration of a build, so two runs never write the same shards."""
    f = open(out / ".prepare.lock", "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        pass
    except OSError:
        f.close()
        raise DatasetError(
            f"Another prepare/synthetic run is writing to OUT {out}; wait for it to finish or stop it first."
        ) from None
    return f


def _build_locked(
    cfg: BuildConfig, out: Path, src, n: int, rows_per_group: int, shard_size: int, fingerprint: str
) -> dict[str, Any]:

    manifest_path = out / MANIFEST_NAME
    state_path = out / STATE_NAME
    if manifest_path.exists() or state_path.exists():
        previous = None
        for p in (manifest_path, state_path):
            if p.exists():
                try:
                    previous = json.loads(p.read_text()).get("fingerprint")
                except (OSError, ValueError):
                    previous = "unreadable"
                break
        if previous != fingerprint:
            if not cfg.overwrite:
                raise DatasetError(
                    f"OUT {out} already holds a dataset made from other inputs or settings; "
                    "pass --overwrite to replace it or choose another OUT."
                )
            _clear_outputs(out)
        elif manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            _log(cfg, f"[{cfg.tool}] {out} is already complete ({manifest['num_images']} images); nothing to do.")
            manifest["_already_complete"] = True
            manifest["_out"] = str(out)
            return manifest
    shard_dir = out / SHARD_DIR
    for p in shard_dir.glob("*.tmp"):
        p.unlink()

    num_shards = math.ceil(n / shard_size)
    done: dict[int, dict[str, Any]] = {}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        for rec in state.get("shards", []):
            f = rec.get("file")
            if f is None or ((out / f).exists() and (out / f).stat().st_size == rec["bytes"]):
                done[int(rec["index"])] = rec
    pending = [i for i in range(num_shards) if i not in done]

    def save_state() -> None:
        atomic_write_json(
            state_path,
            {"fingerprint": fingerprint, "tool": cfg.tool, "shards": [done[k] for k in sorted(done)]},
        )

    if cfg.strict:
        for rec in done.values():
            if rec["skipped"]:
                raise _strict_error(rec)

    remaining_inputs = sum(min(n, (i + 1) * shard_size) - i * shard_size for i in pending)
    need = remaining_inputs * _estimate_bytes_per_image(cfg)
    free = shutil.disk_usage(out).free
    if need > free:
        raise DatasetError(
            f"Not enough disk space in OUT {out}: about {fmt_bytes(need)} needed, {fmt_bytes(free)} free."
        )
    save_state()

    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(pending))) if pending else 1
    if done:
        _log(cfg, f"[{cfg.tool}] resuming: {len(done)}/{num_shards} shards already done, {len(pending)} to go")
    _log(
        cfg,
        f"[{cfg.tool}] {n} inputs -> {num_shards} shards of {shard_size}, "
        f"resolutions {cfg.levels[0]}..{cfg.levels[-1]}, {workers} worker process(es)",
    )

    t0 = time.monotonic()
    start_done_inputs = sum(r["inputs"][1] - r["inputs"][0] for r in done.values())
    stats = {"last": t0}

    def skipped_so_far() -> int:
        return sum(len(r["skipped"]) for r in done.values())

    def report(processed: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - stats["last"] < cfg.progress_interval:
            return
        stats["last"] = now
        total_done = start_done_inputs + processed
        rate = processed / max(now - t0, 1e-9)
        eta = (n - total_done) / rate if rate > 0 else float("inf")
        eta_s = fmt_duration(eta) if math.isfinite(eta) else "?"
        _log(
            cfg,
            f"[{cfg.tool}] {total_done}/{n} inputs ({100.0 * total_done / n:.1f}%), "
            f"{len(done)}/{num_shards} shards, {skipped_so_far()} skipped, {rate:.0f} inputs/s, ETA {eta_s}",
        )

    def finish_shard(rec: dict[str, Any]) -> None:
        done[rec["index"]] = rec
        save_state()
        if cfg.strict and rec["skipped"]:
            raise _strict_error(rec)

    processed_counter = mp.get_context("forkserver").Value("q", 0) if workers > 1 else _LocalCounter()

    def translate(exc: BaseException) -> BaseException:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return DatasetError(
                f"Not enough disk space in OUT {out}: the disk filled up while writing shards; "
                "free some space and run the same command again to continue."
            )
        if isinstance(exc, PermissionError):
            return DatasetError(f"OUT {out} is not writable: permission denied.")
        return exc

    shards_built = 0
    try:
        if workers == 1:
            _init_worker(cfg, processed_counter)
            _WORKER["tick"] = lambda: report(processed_counter.value)
            try:
                for i in pending:
                    if cfg.stop_after_shards is not None and shards_built >= cfg.stop_after_shards:
                        raise KeyboardInterrupt
                    lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
                    try:
                        rec = _build_shard(i, lo, hi, fingerprint)
                    except OSError as exc:
                        raise translate(exc) from None
                    finish_shard(rec)
                    shards_built += 1
            finally:
                _WORKER.clear()
        else:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["data_pipeline.builder", "pyarrow.parquet", "PIL.Image"])
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, processed_counter)
            ) as pool:
                futures = {}
                for i in pending:
                    lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
                    futures[pool.submit(_build_shard, i, lo, hi, fingerprint)] = i
                pending = set(futures)
                try:
                    while pending:
                        finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                        for fut in sorted(finished, key=lambda f: futures[f]):
                            exc = fut.exception()
                            if exc is not None:
                                raise translate(exc)
                            finish_shard(fut.result())
                            shards_built += 1
                            if cfg.stop_after_shards is not None and shards_built >= cfg.stop_after_shards:
                                raise KeyboardInterrupt
                        report(processed_counter.value)
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    except KeyboardInterrupt:
        raise DatasetInterrupted(
            f"Interrupted: {len(done)}/{num_shards} shards are finished and kept; "
            "run the same command again to finish the job."
        ) from None
    report(processed_counter.value, force=True)

    shards = [done[i] for i in range(num_shards)]
    skipped = [s for rec in shards for s in rec["skipped"]]
    num_images = sum(rec["rows"] for rec in shards)
    if num_images == 0:
        first = skipped[0] if skipped else {"path": "?", "reason": "?"}
        raise DatasetError(
            f"None of the {n} inputs could be used (e.g. {first['path']}: {first['reason']}); "
            f"see {state_path} for the full list."
        )
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"data_pipeline.{cfg.tool}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint,
        "resolution": max(cfg.levels),
        "resolutions": list(cfg.levels),
        "num_images": num_images,
        "channels": 3,
        "layout": "one row per image; columns id, path, res<R>..., label_<name>...",
        "encodings": {str(r): cfg.encodings[r] for r in cfg.levels},
        "columns": {str(r): column_name(r) for r in cfg.levels},
        "rows_per_group": rows_per_group,
        "shard_size": shard_size,
        "shards": [
            {k: rec[k] for k in ("file", "rows", "bytes", "sha256", "first_id", "last_id")}
            for rec in shards
            if rec["rows"] > 0
        ],
        "source": src.describe(),
        "synthetic": False,
        "labels": [{k: v for k, v in s.items() if k != "source_name"} for s in cfg.label_spec],
        "num_inputs": n,
        "num_resized": sum(rec["resized"] for rec in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    for s, s_out in zip(cfg.label_spec, manifest["labels"]):
        s_out["column"] = label_column(s["name"])
    manifest.update(cfg.extra_manifest)
    atomic_write_json(manifest_path, manifest)
    state_path.unlink()
    elapsed = time.monotonic() - t0
    manifest["_elapsed_s"] = elapsed
    manifest["_out"] = str(out)
    return manifest


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a meaningful default."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class DatasetInterrupted(DatasetError):
    """The build was interrupted; finished shards are kept."""


class _LocalCounter:
    def __init__(self) -> None:
        self.value = 0

    def get_lock(self):
        return _NullLock()


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def install_sigterm_handler() -> None:
    """Make SIGTERM stop a CLI run like Ctrl-C does: finished shards are kept, the run can be resumed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass


def summary_lines(manifest: dict[str, Any], out: str) -> list[str]:
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines = [
        f"Wrote {manifest['num_images']} images at {', '.join(map(str, manifest['resolutions']))} px "
        f"into {len(manifest['shards'])} shards ({fmt_bytes(total_bytes)}) in {out}",
        f"  inputs: {manifest.get('num_inputs', manifest['num_images'])}, used: {manifest['num_images']}, "
        f"resized: {manifest.get('num_resized', 0)}, skipped: {len(manifest['skipped'])}",
    ]
    reasons: dict[str, int] = {}
    for s in manifest["skipped"]:
        key = s["reason"].split(" (")[0]
        key = "wrong size" if key.startswith("wrong size") else key
        reasons[key] = reasons.get(key, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {count}: {reason}")
    for s in manifest["skipped"][:5]:
        lines.append(f"    {s['path']}: {s['reason']}")
    if len(manifest["skipped"]) > 5:
        lines.append(f"    ... see 'skipped' in {os.path.join(out, MANIFEST_NAME)}")
    return lines


def cli_main(tool: str, run: Callable[[list[str] | None], dict[str, Any]], argv: list[str] | None) -> int:
    """The shared command-line wrapper of prepare and synthetic: one-sentence errors, resumable interruptions
    (exit 130), and the summary."""
    install_sigterm_handler()
    try:
        manifest = run(argv)
    except DatasetInterrupted as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 130
    except DatasetError as exc:
        print(f"{tool}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; run the same command again to finish the job.", file=sys.stderr)
        return 130
    for line in summary_lines(manifest, manifest["_out"]):
        print(line)
    return 0
