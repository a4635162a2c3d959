"""Progressive-growing schedule: a pure function of ``cur_nimg`` and the config, so a resumed run is the
same run. Mirrors the official ``training_schedule``: level of detail (lod) counts down from
log2(R_final) - log2(R_start) to 0; each phase is ``stabilise_kimg`` at a resolution followed by
``fade_kimg`` fading in the next one. During a fade the *new* resolution is already the current one
and ``alpha`` ramps 0 -> 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config, log2i


@dataclass(frozen=True)
class Phase:
    kimg: float
    lod: float  # level of detail: 0 = final resolution, fractional while fading
    resolution: int  # resolution the networks run at
    alpha: float  # fade-in weight of the newest resolution (1 = fully in)
    batch_per_gpu: int
    batch: int  # global minibatch = batch_per_gpu * world_size
    lr: float
    tick_kimg: float

    @property
    def fading(self) -> bool:
        return self.alpha < 1.0


def phase_at(cfg: Config, cur_nimg: int, world_size: int = 1) -> Phase:
    s = cfg.schedule
    kimg = cur_nimg / 1000.0
    phase_dur = s.stabilise_kimg + s.fade_kimg
    phase_idx = int(math.floor(kimg / phase_dur)) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = float(log2i(cfg.model.resolution) - log2i(s.start_resolution) - phase_idx)
    if s.fade_kimg > 0:
        lod -= max(phase_kimg - s.stabilise_kimg, 0.0) / s.fade_kimg
    lod = max(lod, 0.0)
    resolution = 2 ** (log2i(cfg.model.resolution) - int(math.floor(lod)))
    alpha = 1.0 - (lod - math.floor(lod))
    per_gpu = s.batch_per_gpu.get(resolution, s.batch_base)
    lr = s.lr_dict.get(resolution, s.lr_base)
    if cfg.loss.kind == "wgan_gp" and cfg.loss.wgan_lr_cap > 0:
        lr = min(lr, cfg.loss.wgan_lr_cap)  # official CelebA-HQ WGAN-GP configuration
    return Phase(
        kimg=kimg,
        lod=lod,
        resolution=resolution,
        alpha=alpha,
        batch_per_gpu=per_gpu,
        batch=per_gpu * world_size,
        lr=lr,
        tick_kimg=s.tick_kimg_dict.get(resolution, s.tick_kimg_base),
    )


def lod_changed(prev: Phase | None, cur: Phase) -> bool:
    """True when a fade starts or ends: the official code resets Adam's state then."""
    if prev is None:
        return False
    return math.floor(prev.lod) != math.floor(cur.lod) or math.ceil(prev.lod) != math.ceil(cur.lod)


def schedule_table(cfg: Config, world_size: int = 1) -> list[dict]:
    """One row per segment (stabilise or fade) from 0 to total_kimg, for --dry-run and docs."""
    s = cfg.schedule
    rows = []
    kimg = 0.0
    total = s.total_kimg
    phase_dur = s.stabilise_kimg + s.fade_kimg
    while kimg < total:
        p = phase_at(cfg, int(round(kimg * 1000)) + 1, world_size)
        if p.lod == 0.0 or phase_dur <= 0:
            end = total
        else:
            idx = math.floor(kimg / phase_dur)
            in_phase = kimg - idx * phase_dur
            end = idx * phase_dur + (s.stabilise_kimg if in_phase < s.stabilise_kimg else phase_dur)
            end = min(end, total)
        rows.append(dict(start_kimg=kimg, end_kimg=end, resolution=p.resolution,
                         stage="fade-in" if p.fading else "stable", batch_per_gpu=p.batch_per_gpu,
                         batch=p.batch, lr=p.lr, tick_kimg=p.tick_kimg))
        if end <= kimg:
            break
        kimg = end
    return rows


def format_schedule(cfg: Config, world_size: int = 1) -> str:
    lines = [f"{'kimg':>17}  {'res':>5}  {'stage':<8} {'batch/gpu':>9} {'batch':>6} {'lr':>7} {'tick kimg':>9}"]
    for r in schedule_table(cfg, world_size):
        lines.append(f"{r['start_kimg']:>7.0f} - {r['end_kimg']:>7.0f}  {r['resolution']:>5}  {r['stage']:<8} "
                     f"{r['batch_per_gpu']:>9} {r['batch']:>6} {r['lr']:>7.4g} {r['tick_kimg']:>9g}")
    return "\n".join(lines)
