"""Storage locations: a local path or a URI that ``pyarrow.fs`` resolves (``s3://bucket/prefix``, ``gs://...``,
``file://...``), one string type for both.

Every path the product writes or reads at run time (runs, checkpoints, sample grids, configs, datasets, FID
statistics caches, sweep state, reports) goes through this module, so the same code runs on one disk, on a shared
filesystem, or on object storage with no shared disk at all.

* Local paths (and ``file://`` URIs) are made absolute and use the OS directly: writes go to a temporary name and
  are renamed, so a crash leaves the old file or the new one, never half of one.
* ``s3://`` gets an ``S3FileSystem`` with bounded timeouts and retries and the endpoint from ``AWS_ENDPOINT_URL_S3``
  / ``AWS_ENDPOINT_URL`` (S3-compatible servers: MinIO, Ceph, moto); an object PUT is atomic by itself. Other
  schemes go through ``pyarrow.fs.FileSystem.from_uri``.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Environment variable that sets the default --storage (an absolute path or a URI), e.g. on a cluster.
STORAGE_ENV = "STYLEGAN_DIST_STORAGE"


class StorageError(RuntimeError):
    """A storage location that cannot be used; the message is one sentence."""


def is_uri(loc: str | os.PathLike) -> bool:
    """True for a non-local URI (``s3://``, ``gs://``, ...); local paths and ``file://`` are not."""
    s = str(loc)
    return "://" in s and not s.startswith("file://")


def scheme(loc: str | os.PathLike) -> str:
    return urlsplit(str(loc)).scheme if is_uri(loc) else "file"


def resolve(loc: str | os.PathLike) -> str:
    """Canonical form: an absolute local path, or the URI without a trailing slash."""
    s = str(loc)
    if s.startswith("file://"):
        s = urlsplit(s).path
    if is_uri(s):
        return s.rstrip("/")
    return str(Path(s).expanduser().resolve())


def local_path(loc: str | os.PathLike) -> Path | None:
    """The local path of a location, or None for an object-store URI."""
    return None if is_uri(loc) else Path(resolve(loc))


def join(loc: str | os.PathLike, *parts: str) -> str:
    if is_uri(loc):
        return posixpath.join(str(loc).rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(resolve(loc)).joinpath(*parts))


def name(loc: str | os.PathLike) -> str:
    return posixpath.basename(str(loc).rstrip("/"))


def parent(loc: str | os.PathLike) -> str:
    if is_uri(loc):
        s = str(loc).rstrip("/")
        head = posixpath.dirname(s)
        return head if "://" in head and not head.endswith(":/") else s
    return str(Path(resolve(loc)).parent)


def is_relative(loc: str | os.PathLike) -> bool:
    s = str(loc)
    return not is_uri(s) and not s.startswith("file://") and not os.path.isabs(os.path.expanduser(s))


# ------------------------------------------------------------------------------------------- filesystems


def _fs_for(scheme_: str, netloc: str, query: str):
    """The filesystem of a URI; S3 settings come from the environment, read now (so a changed endpoint is used)."""
    if scheme_ == "s3" and not query:
        return _s3(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None,
                   os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                   float(os.environ.get("STYLEGAN_DIST_S3_CONNECT_TIMEOUT", "5")),
                   float(os.environ.get("STYLEGAN_DIST_S3_REQUEST_TIMEOUT", "60")))
    return _from_uri(f"{scheme_}://{netloc}/" + (f"?{query}" if query else ""))


@lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None, connect_timeout: float, request_timeout: float):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, region=region, connect_timeout=connect_timeout,
                             request_timeout=request_timeout,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))


@lru_cache(maxsize=16)
def _from_uri(uri: str):
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(uri)
    return fs


def filesystem(loc: str | os.PathLike):
    """``(pyarrow filesystem, path inside it)`` for a location (picklable: Ray tasks get it as an argument)."""
    import pyarrow.fs as pafs

    if not is_uri(loc):
        return pafs.LocalFileSystem(use_mmap=True), resolve(loc)
    parts = urlsplit(str(loc))
    try:
        fs = _fs_for(parts.scheme, parts.netloc, parts.query)
    except Exception as e:  # unknown scheme, missing credentials helper, bad query
        raise StorageError(f"Cannot open storage {loc}: {_short(e)}.") from None
    return fs, (parts.netloc + parts.path).rstrip("/")


def uri_of(fs_path: str, like: str) -> str:
    """Turn a path inside the filesystem of ``like`` back into a location string."""
    if not is_uri(like):
        return fs_path
    return f"{urlsplit(like).scheme}://{fs_path.lstrip('/')}"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return msg[:300].rstrip(".")


def _info(loc: str):
    fs, p = filesystem(loc)
    try:
        return fs.get_file_info(p)
    except OSError as e:
        raise StorageError(f"Cannot reach storage {loc}: {_short(e)}.") from None


# ---------------------------------------------------------------------------------------------- queries


def exists(loc: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    p = local_path(loc)
    if p is not None:
        return p.exists()
    return _info(str(loc)).type != pafs.FileType.NotFound


def is_file(loc: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    p = local_path(loc)
    if p is not None:
        return p.is_file()
    return _info(str(loc)).type == pafs.FileType.File


def is_dir(loc: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    p = local_path(loc)
    if p is not None:
        return p.is_dir()
    return _info(str(loc)).type == pafs.FileType.Directory


def version(loc: str | os.PathLike) -> str:
    """Size and modification time of a file, as a short string that changes when the file is replaced."""
    p = local_path(loc)
    if p is not None:
        st = p.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"
    info = _info(str(loc))
    return f"{info.size}-{info.mtime_ns}"


def list_dir(loc: str | os.PathLike) -> list[str]:
    """Names of the direct children of a directory (empty when it does not exist), sorted."""
    import pyarrow.fs as pafs

    p = local_path(loc)
    if p is not None:
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    fs, fp = filesystem(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(fp, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"Cannot list storage {loc}: {_short(e)}.") from None
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def check_location(loc: str | os.PathLike, what: str = "storage") -> str:
    """Resolve ``loc`` and check that it can be used: for object storage, that the endpoint answers and the bucket
    exists. Returns the resolved location; raises StorageError with one sentence otherwise. Writes nothing."""
    import pyarrow.fs as pafs

    loc = resolve(loc)
    if not is_uri(loc):
        return loc
    fs, fp = filesystem(loc)
    bucket = fp.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"The {what} URI {loc} names no bucket; use {scheme(loc)}://BUCKET/PREFIX.")
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        raise StorageError(f"Cannot reach the object store for {what} {loc} ({endpoint}): {_short(e)}.") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"The bucket '{bucket}' of {what} {loc} does not exist; create it first or use another "
                           f"URI.")
    return loc


# ------------------------------------------------------------------------------------------------ reads


def read_bytes(loc: str | os.PathLike) -> bytes:
    p = local_path(loc)
    try:
        if p is not None:
            return p.read_bytes()
        fs, fp = filesystem(loc)
        with fs.open_input_stream(fp) as f:
            return f.readall()
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "NoSuchKey" in str(e) or "does not exist" in str(e).lower():
            raise FileNotFoundError(str(loc)) from None
        raise StorageError(f"Cannot read {loc}: {_short(e)}.") from None


def read_text(loc: str | os.PathLike) -> str:
    return read_bytes(loc).decode("utf-8")


def open_input_file(loc: str | os.PathLike, memory_map: bool = False):
    """A random-access file (what ``pyarrow.parquet.ParquetFile`` wants)."""
    import pyarrow as pa

    p = local_path(loc)
    if p is not None:
        return pa.memory_map(str(p), "r") if memory_map else pa.OSFile(str(p), "rb")
    fs, fp = filesystem(loc)
    try:
        return fs.open_input_file(fp)
    except OSError as e:
        raise StorageError(f"Cannot read {loc}: {_short(e)}.") from None


def download(loc: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a file to a local path (a no-op copy for local files is avoided: their own path is returned)."""
    p = local_path(loc)
    if p is not None:
        return p
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    fs, fp = filesystem(loc)
    try:
        with fs.open_input_stream(fp) as src, open(tmp, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"Cannot download {loc}: {_short(e)}.") from None
    return dest


# ----------------------------------------------------------------------------------------------- writes


def makedirs(loc: str | os.PathLike) -> None:
    """Create a directory (local) or nothing (object stores have no directories)."""
    p = local_path(loc)
    if p is not None:
        p.mkdir(parents=True, exist_ok=True)


def write_bytes(loc: str | os.PathLike, data: bytes) -> str:
    """Write a whole file atomically: readers see the old content or the new, never a part."""
    p = local_path(loc)
    if p is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return str(p)
    fs, fp = filesystem(loc)
    try:
        with fs.open_output_stream(fp) as f:  # one object PUT (or multipart completed at close): atomic
            f.write(data)
    except OSError as e:
        raise StorageError(f"Cannot write {loc}: {_short(e)}.") from None
    return str(loc)


def write_text(loc: str | os.PathLike, text: str) -> str:
    return write_bytes(loc, text.encode("utf-8"))


def upload(src: str | os.PathLike, loc: str | os.PathLike) -> str:
    """Copy a local file to a location, atomically."""
    p = local_path(loc)
    if p is not None:
        if Path(src).resolve() == p:
            return str(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        return str(p)
    fs, fp = filesystem(loc)
    try:
        with open(src, "rb") as f, fs.open_output_stream(fp) as out:
            while chunk := f.read(8 << 20):
                out.write(chunk)
    except OSError as e:
        raise StorageError(f"Cannot write {loc}: {_short(e)}.") from None
    return str(loc)


def delete(loc: str | os.PathLike) -> None:
    """Remove a file or a directory tree; missing is fine."""
    p = local_path(loc)
    if p is not None:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, fp = filesystem(loc)
    info = _info(str(loc))
    try:
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(fp)
        elif info.type == pafs.FileType.File:
            fs.delete_file(fp)
    except OSError as e:
        raise StorageError(f"Cannot delete {loc}: {_short(e)}.") from None


def move(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Rename a file or directory (object stores: copy, then delete the source)."""
    ps, pd = local_path(src), local_path(dst)
    if ps is not None and pd is not None:
        ps.rename(pd)
        return str(pd)
    import pyarrow.fs as pafs

    fs, fsrc = filesystem(src)
    _, fdst = filesystem(dst)
    try:
        pafs.copy_files(fsrc, fdst, source_filesystem=fs, destination_filesystem=fs)
    except OSError as e:
        raise StorageError(f"Cannot move {src} to {dst}: {_short(e)}.") from None
    delete(src)
    return str(dst)


def save_torch(obj: Any, loc: str | os.PathLike) -> str:
    """``torch.save`` to a location, atomically (local: temporary name + fsync + rename; object store: one PUT)."""
    import torch

    p = local_path(loc)
    if p is not None:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
        try:
            torch.save(obj, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        return str(p)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(loc, buf.getvalue())


# -------------------------------------------------------------------------------------- run-time context


def under_ray_job() -> bool:
    """True when this process is the driver of a ``ray job submit`` job: its working directory is Ray's
    temporary copy of the job's working_dir, deleted with the Ray session."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) or "_ray_pkg_" in os.getcwd()


def default_storage(fallback: str = "runs") -> str:
    return os.environ.get(STORAGE_ENV) or fallback


def check_storage_arg(loc: str | os.PathLike | None, flag: str = "--storage", fallback: str = "runs") -> str:
    """The storage a command should use: the argument, else $STYLEGAN_DIST_STORAGE, else ``fallback``. Under a Ray
    job a relative path is refused (it would land in Ray's temporary working directory). Reachability and the
    bucket are checked. Returns the resolved location."""
    chosen = str(loc) if loc else default_storage(fallback)
    if under_ray_job() and is_relative(chosen):
        raise StorageError(f"{flag} {chosen} is a relative path inside a Ray job, whose working directory is Ray's "
                           f"temporary copy; pass an absolute shared path or a URI (s3://BUCKET/PREFIX), or set "
                           f"{STORAGE_ENV} on the cluster.")
    return check_location(chosen, what=flag.lstrip("-"))


def walk_files(loc: str | os.PathLike) -> list[str]:
    """Every file under a directory (recursively), as paths relative to it, sorted."""
    import pyarrow.fs as pafs

    p = local_path(loc)
    if p is not None:
        return sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    fs, fp = filesystem(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(fp, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"Cannot list storage {loc}: {_short(e)}.") from None
    return sorted(posixpath.relpath(i.path, fp) for i in infos if i.type == pafs.FileType.File)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, log=None) -> int:
    """Copy every file under ``src`` to the same relative path under ``dst`` (either side local or a URI), each
    file atomically; returns the number of files."""
    files = walk_files(src)
    if not files:
        raise StorageError(f"{src} holds no files to copy.")
    for i, rel in enumerate(files, 1):
        s, d = join(src, *rel.split("/")), join(dst, *rel.split("/"))
        if local_path(s) is not None:
            upload(s, d)
        elif local_path(d) is not None:
            download(s, d)
        else:
            write_bytes(d, read_bytes(s))
        if log is not None and (i % 50 == 0 or i == len(files)):
            log(f"  {i}/{len(files)} files")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """List or copy files through the same storage layer the product uses."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.storage", description=main.__doc__ + (
        " Locations are local paths or URIs (s3://bucket/prefix; S3-compatible servers through AWS_ENDPOINT_URL)."
        "\n\nExamples:\n  python -m stylegan_dist.storage copy data/shapes32 s3://bucket/shapes32\n"
        "  python -m stylegan_dist.storage ls s3://bucket/runs/demo"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="list the files under a location")
    ls.add_argument("location")
    cp = sub.add_parser("copy", help="copy a directory tree (e.g. a prepared dataset) between locations")
    cp.add_argument("src")
    cp.add_argument("dst")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "ls":
            for rel in walk_files(check_location(args.location)):
                print(rel)
            return 0
        check_location(args.dst, what="destination")
        n = copy_tree(check_location(args.src, what="source"), resolve(args.dst), log=print)
        print(f"Copied {n} files from {resolve(args.src)} to {resolve(args.dst)}.")
        return 0
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
