"""Checkpoints: plain state dicts plus the resolved config, written to a temporary name then renamed."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from . import storage

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one sentence."""


def checkpoint_name(cur_nimg: int) -> str:
    return f"ckpt-{cur_nimg:010d}.pt"


def atomic_save(obj: Any, path: str | Path) -> str:
    """Save to a local path or a storage URI, atomically (see ``storage.save_torch``)."""
    return storage.save_torch(obj, path)


def list_checkpoints(directory: str | Path) -> list[str]:
    """Checkpoints in ``directory`` (local or a storage URI), oldest first (by the image count in the name)."""
    found = [(int(m.group(1)), n) for n in storage.list_dir(directory) if (m := _NAME.match(n))]
    return [storage.join(directory, n) for _, n in sorted(found)]


def latest_checkpoint(directory: str | Path) -> str | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for p in list_checkpoints(directory)[:-keep]:
        storage.delete(p)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint from a local path or a storage URI."""
    try:
        if not storage.is_file(path):
            raise CheckpointError(f"Checkpoint {path} does not exist.")
        source = storage.local_path(path) or io.BytesIO(storage.read_bytes(path))
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(
            f"Checkpoint {path} could not be read ({type(e).__name__}); it may be truncated."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a stylegan_dist checkpoint of format {FORMAT_VERSION}.")
    return ckpt
