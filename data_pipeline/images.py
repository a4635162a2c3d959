"""Finding and loading source images: folders, zips, FFHQ layout, label files.

Loading rules (documented in README):

* EXIF orientation is applied (``ImageOps.exif_transpose``).
* Grayscale (L, I;16, I, F), palette (P), CMYK, YCbCr, LA and RGBA become RGB. Transparency is
  composited over black (so transparent pixels, whose stored colours are arbitrary, become black).
  16-bit/float grayscale is scaled to 8 bit.
* A square image of exactly R x R is used as is. Any other image is centre-cropped to a square of its
  shorter side and resized to R x R with PIL's Lanczos filter (``Image.LANCZOS``, which antialiases
  when shrinking) -- or rejected with reason ``wrong size`` when ``no_resize`` is set.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .format import DatasetError

IMAGE_EXTENSIONS = {
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif",
}  # fmt: skip
RESIZE_FILTER = "lanczos"

ImageFile.LOAD_TRUNCATED_IMAGES = False


class SkipImage(Exception):
    """An input that cannot be used; ``str(exc)`` is the reason recorded in the manifest."""


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


@dataclass
class SourceListing:
    """The sorted image files of a SOURCE folder or zip (paths relative to SOURCE, POSIX style)."""

    source: str  # absolute path
    kind: str  # "folder" or "zip"
    files: list[str]
    sizes: list[int]
    mtimes: list[float]
    ignored: int  # files that are not images by extension (not counted as skipped)

    def read_bytes(self, index: int, zip_handle: zipfile.ZipFile | None = None) -> bytes:
        rel = self.files[index]
        if self.kind == "zip":
            assert zip_handle is not None
            return zip_handle.read(rel)
        with open(os.path.join(self.source, rel), "rb") as f:
            return f.read()


def list_source(source: str | os.PathLike) -> SourceListing:
    """List image files in a folder (recursively) or zip archive, sorted by path."""
    src = Path(source)
    if not src.exists():
        raise DatasetError(f"SOURCE {src} does not exist.")
    files: list[tuple[str, int, float]] = []
    ignored = 0
    if src.is_dir():
        kind = "folder"
        for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for name in filenames:
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, src).replace(os.sep, "/")
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                try:
                    st = os.stat(full)
                except OSError:
                    st = None
                files.append((rel, st.st_size if st else -1, st.st_mtime if st else 0.0))
    elif zipfile.is_zipfile(src):
        kind = "zip"
        try:
            with zipfile.ZipFile(src) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    parts = PurePosixPath(info.filename).parts
                    if _is_hidden(parts):
                        continue
                    if os.path.splitext(info.filename)[1].lower() not in IMAGE_EXTENSIONS:
                        ignored += 1
                        continue
                    files.append((info.filename, info.file_size, float(info.CRC)))
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"SOURCE {src} is a damaged zip file ({exc}).") from None
    else:
        raise DatasetError(f"SOURCE {src} is neither a folder nor a zip file.")
    files.sort(key=lambda t: t[0])
    if not files:
        extra = f" ({ignored} other files ignored)" if ignored else ""
        raise DatasetError(
            f"SOURCE {src} contains no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}){extra}."
        )
    return SourceListing(
        source=str(src.resolve()),
        kind=kind,
        files=[f[0] for f in files],
        sizes=[f[1] for f in files],
        mtimes=[f[2] for f in files],
        ignored=ignored,
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited over black."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([arr] * 3, axis=-1), "RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("RGBA")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def centre_crop_resize(im: Image.Image, resolution: int) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    if (w, h) != (s, s):
        left = (w - s) // 2
        top = (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if s != resolution:
        im = im.resize((resolution, resolution), Image.LANCZOS)
    return im


def decode_image(data: bytes, resolution: int, *, no_resize: bool = False) -> tuple[np.ndarray, bool]:
    """Bytes of an image file -> (HWC uint8 RGB array of R x R, resized?). Raises :class:`SkipImage`."""
    if len(data) == 0:
        raise SkipImage("zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except UnidentifiedImageError:
        raise SkipImage("not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipImage("too large (decompression bomb check)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise SkipImage("truncated") from None
        raise SkipImage(f"unreadable ({msg})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        pass
    if im.size[0] == 0 or im.size[1] == 0:
        raise SkipImage("empty image")
    try:
        im = to_rgb(im)
    except (OSError, ValueError) as exc:
        raise SkipImage(f"unreadable ({exc})") from None
    resized = im.size != (resolution, resolution)
    if resized:
        if no_resize:
            raise SkipImage(f"wrong size {im.size[0]}x{im.size[1]} (expected {resolution}x{resolution}, --no-resize)")
        im = centre_crop_resize(im, resolution)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (resolution, resolution, 3):
        raise SkipImage(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr), resized


# ----------------------------------------------------------------------------------------------- labels

_ID_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_id", "name", "fname")


def _label_key_variants(rel: str) -> list[str]:
    p = PurePosixPath(rel)
    return [rel, p.name, p.stem]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def read_label_file(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a CSV or JSON label file into ``{image key: {label name: raw value}}``.

    CSV: a header row; the image column is the first one named path/file/filename/image/name (or the
    first column); every other column is a label. JSON: ``{"labels": [[path, value], ...]}`` (the
    StyleGAN2-ADA ``dataset.json``; the label is named ``class``, lists become ``class_0``, ``class_1``...),
    ``{path: {name: value}}``, ``{path: value}`` or ``[{"path": ..., name: value}, ...]``. Keys may be
    the path relative to SOURCE, the file name or its stem.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"Label file {p} does not exist.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Label file {p} cannot be read ({exc}).") from None
    table: dict[str, dict[str, Any]] = {}
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"Label file {p} is not valid JSON ({exc}).") from None

        def put(key: str, value: Any) -> None:
            if isinstance(value, dict):
                table[str(key)] = dict(value)
            elif isinstance(value, (list, tuple)):
                table[str(key)] = {f"class_{i}": v for i, v in enumerate(value)}
            else:
                table[str(key)] = {"class": value}

        if isinstance(obj, dict) and isinstance(obj.get("labels"), list):
            for entry in obj["labels"]:
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise DatasetError(f"Label file {p}: each entry of 'labels' must be [path, value].")
                put(entry[0], entry[1])
        elif isinstance(obj, dict):
            for key, value in obj.items():
                put(key, value)
        elif isinstance(obj, list):
            for entry in obj:
                if not isinstance(entry, dict):
                    raise DatasetError(f"Label file {p}: a JSON list must hold objects with a 'path' key.")
                key = next((entry[k] for k in _ID_COLUMNS if k in entry), None)
                if key is None:
                    raise DatasetError(f"Label file {p}: an entry has none of the keys {', '.join(_ID_COLUMNS)}.")
                table[str(key)] = {k: v for k, v in entry.items() if k not in _ID_COLUMNS}
        else:
            raise DatasetError(f"Label file {p} holds neither a JSON object nor a list.")
    else:
        sample = text[:4096]
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t ")
        except csv.Error:
            dialect = csv.excel
        rows = list(csv.reader(io.StringIO(text), dialect))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if len(rows) < 2:
            raise DatasetError(f"Label file {p} needs a header row and at least one data row.")
        header = [h.strip() for h in rows[0]]
        key_col = next((i for i, h in enumerate(header) if h.lower() in _ID_COLUMNS), 0)
        for r in rows[1:]:
            if len(r) != len(header):
                raise DatasetError(f"Label file {p}: a row has {len(r)} fields but the header has {len(header)}.")
            table[r[key_col].strip()] = {h: r[i].strip() for i, h in enumerate(header) if i != key_col}
    if not table:
        raise DatasetError(f"Label file {p} holds no labels.")
    return table


def build_label_spec(table: dict[str, dict[str, Any]], max_classes: int = 64) -> list[dict[str, Any]]:
    """Infer each label's kind: categorical (strings, bools, or <= max_classes distinct integers) or
    continuous (other numbers)."""
    names: list[str] = []
    for entry in table.values():
        for k in entry:
            if k not in names:
                names.append(k)
    spec = []
    for name in names:
        values = [e[name] for e in table.values() if name in e]
        nums = [_as_number(v) for v in values]
        numeric = all(n is not None and math.isfinite(n) for n in nums)
        distinct = sorted(set(nums)) if numeric else sorted({str(v) for v in values})
        integral = numeric and all(float(n).is_integer() for n in nums)
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name)) or "label"
        if numeric and not (integral and len(distinct) <= max_classes):
            spec.append({"name": safe, "source_name": name, "kind": "continuous"})
        else:
            classes = [int(d) if integral else d for d in distinct]
            spec.append(
                {
                    "name": safe,
                    "source_name": name,
                    "kind": "categorical",
                    "num_classes": len(classes),
                    "classes": classes,
                }
            )
    seen = set()
    for s in spec:
        if s["name"] in seen:
            raise DatasetError(f"Two labels map to the same column name {s['name']!r}; rename one in the label file.")
        seen.add(s["name"])
    return spec


def encode_labels(entry: dict[str, Any], spec: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw label values of one image -> {name: class index (int) or float}; missing -> KeyError."""
    out = {}
    for s in spec:
        value = entry[s["source_name"]]
        if s["kind"] == "continuous":
            out[s["name"]] = float(_as_number(value))
        else:
            num = _as_number(value)
            key = int(num) if (num is not None and all(isinstance(c, int) for c in s["classes"])) else str(value)
            out[s["name"]] = s["classes"].index(key)
    return out


def match_labels(files: list[str], table: dict[str, dict[str, Any]]) -> list[dict[str, Any] | None]:
    """For each source file, its label entry (by relative path, then file name, then stem) or None."""
    by_name: dict[str, list[str]] = {}
    for key in table:
        for v in set(_label_key_variants(key)):
            by_name.setdefault(v, []).append(key)
    out: list[dict[str, Any] | None] = []
    for rel in files:
        hit = None
        if rel in table:
            hit = table[rel]
        else:
            for v in _label_key_variants(rel)[1:]:
                keys = by_name.get(v, [])
                if len(keys) == 1:
                    hit = table[keys[0]]
                    break
        out.append(hit)
    return out
