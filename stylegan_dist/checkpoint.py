"""Checkpoints: plain state dicts plus the resolved config, written to a temporary name then renamed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one sentence."""


def checkpoint_name(cur_nimg: int) -> str:
    return f"ckpt-{cur_nimg:010d}.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first (by the image count in the name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    for p in list_checkpoints(directory)[:-keep]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(
            f"Checkpoint {path} could not be read ({type(e).__name__}); it may be truncated."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a stylegan_dist checkpoint of format {FORMAT_VERSION}.")
    return ckpt
