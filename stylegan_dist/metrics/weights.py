"""Where the pretrained feature extractors' weight files are found. Nothing is downloaded at run time.

Lookup order for each file: an explicit path (command-line option or ``metrics.*`` config key), then its
environment variable, then ``$STYLEGAN_WEIGHTS_DIR/<file name>``, then ``~/.cache/stylegan_dist/weights/
<file name>``. Each may be a storage URI (``s3://bucket/weights``): the file is then copied once per machine
into the user cache and read from there. A missing file is one sentence that names the file, what it is and
where to put it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from .registry import MetricError


@dataclass(frozen=True)
class WeightSpec:
    key: str
    file_name: str
    env: str
    what: str
    source: str


WEIGHTS: dict[str, WeightSpec] = {
    "inception": WeightSpec(
        "inception", "pt_inception-2015-12-05-6726825d.pth", "STYLEGAN_INCEPTION_WEIGHTS",
        "the FID Inception-v3 weights (pytorch-fid's PyTorch port of the TensorFlow FID graph)",
        "it is the file 'pt_inception-2015-12-05-6726825d.pth' of the 'fid_weights' release of mseitzer/pytorch-fid",
    ),
    "vgg16": WeightSpec(
        "vgg16", "vgg16-397923af.pth", "STYLEGAN_VGG16_WEIGHTS",
        "the ImageNet VGG16 weights in torchvision's state-dict format (LPIPS backbone)",
        "it is torchvision's 'vgg16-397923af.pth' (IMAGENET1K_V1)",
    ),
    "lpips": WeightSpec(
        "lpips", "lpips_vgg_v0.1.pth", "STYLEGAN_LPIPS_WEIGHTS",
        "the LPIPS v0.1 linear-layer weights for VGG",
        "it is 'lpips/weights/v0.1/vgg.pth' inside the lpips package on PyPI",
    ),
    "classifier": WeightSpec(
        "classifier", "attribute_classifier.pt", "STYLEGAN_CLASSIFIER",
        "the attribute classifier for linear separability",
        "make one with 'python -m stylegan_dist.metrics.classifier --data DIR --out FILE' or supply your own",
    ),
}


def weights_dir() -> str:
    """$STYLEGAN_WEIGHTS_DIR (a directory or a storage URI such as s3://bucket/weights), else the user cache."""
    d = os.environ.get("STYLEGAN_WEIGHTS_DIR")
    return storage.resolve(d) if d else str(Path.home() / ".cache" / "stylegan_dist" / "weights")


def _local_copy(loc: str) -> Path:
    """A weight file in object storage, downloaded once per machine into the user cache (keyed by its URI, size and
    modification time, so a replaced file is fetched again)."""
    digest = hashlib.sha256(f"{loc}:{storage.version(loc)}".encode()).hexdigest()[:16]
    local = Path.home() / ".cache" / "stylegan_dist" / "weights" / "remote" / digest / storage.name(loc)
    if not local.is_file():
        storage.download(loc, local)
    return local


def locate_weight(key: str, explicit: str | os.PathLike | None = None) -> str:
    """Location (local path or storage URI) of weight file ``key`` (see WEIGHTS), checked to exist; raises
    MetricError when it is not there. Pass this to other machines: each makes its own local copy."""
    spec = WEIGHTS[key]
    if explicit:
        loc, how = storage.resolve(explicit), "the path given"
    elif os.environ.get(spec.env):
        loc, how = storage.resolve(os.environ[spec.env]), f"${spec.env}"
    else:
        loc, how = storage.join(weights_dir(), spec.file_name), "the default location"
    try:
        found = storage.is_file(loc)
    except storage.StorageError as e:
        raise MetricError(f"{spec.file_name} ({spec.what}) could not be looked up: {e}") from None
    if not found:
        raise MetricError(
            f"{spec.file_name} ({spec.what}) was not found at {loc} ({how}); {spec.source}, so put it there, "
            f"set {spec.env} to its path or pass its path as an option."
        )
    return loc


def resolve_weight(key: str, explicit: str | os.PathLike | None = None) -> Path:
    """Local path of weight file ``key``, downloaded first when it lives in object storage (see locate_weight)."""
    loc = locate_weight(key, explicit)
    if storage.is_uri(loc):
        try:
            return _local_copy(loc)
        except storage.StorageError as e:
            raise MetricError(str(e)) from None
    return Path(loc)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def module_digest(module) -> str:
    """sha256 over a module's state dict (names, shapes, values): identifies injected random extractors."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
