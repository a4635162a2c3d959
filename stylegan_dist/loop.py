"""The StyleGAN training loop in plain PyTorch: one function, single process or one rank of many.

It owns the optimisers, the schedule, G_ema, style mixing, ``w_avg``, sample grids and checkpoints; the
loss owns the gradients. Data parallelism is a single ``if ddp:`` around a manual all-reduce of the
gradients of the parameters that are active at the current resolution (progressive growing leaves the
rest without gradients, which DDP's bucketed reducer does not handle well).
"""

from __future__ import annotations

import collections
import copy
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt_mod
from . import storage
from .config import Config, to_dict, to_yaml
from .data import BatchSource
from .images import fade_reals, save_grid, to_float
from .loss import StepContext, StyleGANLoss
from .metrics import metrics_due, run_training_metrics, torch_distributed_gather
from .networks import Discriminator, Generator, build_discriminator, build_generator
from .schedule import Phase, lod_changed, phase_at


class NonFiniteLossError(RuntimeError):
    """optim.max_skipped_steps consecutive steps had non-finite gradients; the message names the kimg. The last
    good checkpoint is kept."""


@dataclass
class LoopResult:
    cur_nimg: int
    ticks: int
    checkpoint: str | None  # location (local path or storage URI)
    grid: str | None
    finished: bool  # reached schedule.total_kimg
    history: list[dict[str, Any]] = field(default_factory=list)


Report = Callable[[dict[str, Any], "str | None"], None]


def configure_perf(cfg: Config, device: torch.device) -> None:
    tf32 = cfg.perf.precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_models(cfg: Config, device: torch.device) -> tuple[Generator, Discriminator, Generator]:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G = build_generator(cfg).to(device).train()
    D = build_discriminator(cfg).to(device).train()
    if cfg.perf.channels_last:
        G = G.to(memory_format=torch.channels_last)
        D = D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G, D, G_ema


def compile_models(G: Generator, D: Discriminator):
    """torch.compile G's mapping and synthesis in place (G.forward stays eager: it draws the style-mixing
    decision on the host) and return a compiled callable of D. State-dict keys are unchanged. The eager D is
    kept for the passes R1 differentiates twice, which compiled graphs cannot."""
    G.mapping.forward = torch.compile(G.mapping.forward)
    G.synthesis.forward = torch.compile(G.synthesis.forward)
    return torch.compile(D)


def make_optimizer(cfg: Config, module: torch.nn.Module, lr: float) -> torch.optim.Adam:
    o = cfg.optim
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(o.beta1, o.beta2), eps=o.eps)


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """G_ema <- lerp(G, G_ema, beta) for parameters; buffers (w_avg) are copied."""
    ema_p = list(G_ema.parameters())
    src_p = list(G.parameters())
    torch._foreach_lerp_(ema_p, src_p, 1.0 - beta)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def allreduce_grads(module: torch.nn.Module, world_size: int) -> bool:
    """Average the gradients over ranks (world_size > 1); return whether they are all finite (one host sync).

    After the all-reduce every rank holds the same gradients, so every rank takes the same skip decision.
    """
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return True
    flat = torch.cat([p.grad.flatten() for p in params])
    if world_size > 1:
        dist.all_reduce(flat)
        flat /= world_size
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    if flat.device.type == "meta":  # FLOP counting (bench) runs the step on shapes only
        return True
    return bool(flat.isfinite().all())


def _reg_gain(step: int, r1_interval: int) -> float | None:
    """None: R1 shares the D pass every step (paper); else lazy R1 every r1_interval steps, scaled up."""
    if r1_interval == 1:
        return None
    return float(r1_interval) if step % r1_interval == 0 else 0.0


def train_step(G: Generator, D: Discriminator, G_ema: Generator, opt_G: torch.optim.Optimizer,
               opt_D: torch.optim.Optimizer, loss: StyleGANLoss, reals: torch.Tensor, ctx: StepContext,
               ema_beta: float, *, reg_gain: float | None = None, world_size: int = 1) -> dict[str, torch.Tensor]:
    """One D step (main loss + R1), one G step, one EMA update. Gradients are averaged over ranks.

    An optimiser step whose gradients are not all finite is not applied (the official optimizer's check);
    ``skipped/D`` and ``skipped/G`` in the returned stats are 1 for a skipped step, else 0.
    """
    ddp = world_size > 1
    G.requires_grad_(False)
    D.requires_grad_(True)
    opt_D.zero_grad(set_to_none=True)
    if reg_gain is None:
        stats = loss.accumulate_gradients("Dboth", reals, ctx)
    else:
        stats = loss.accumulate_gradients("D", reals, ctx)
        if reg_gain > 0:
            stats.update(loss.accumulate_gradients("Dreg", reals, ctx, gain=reg_gain))
    d_ok = allreduce_grads(D, world_size)
    if d_ok:
        opt_D.step()

    G.requires_grad_(True)
    D.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    stats.update(loss.accumulate_gradients("G", reals, ctx))
    g_ok = allreduce_grads(G, world_size)
    if ddp:
        # Each rank moved w_avg towards its own batch mean; the average is the move towards the global mean.
        dist.all_reduce(G.w_avg)
        G.w_avg /= world_size
    if g_ok:
        opt_G.step()
    D.requires_grad_(True)

    update_ema(G_ema, G, ema_beta)
    stats["skipped/D"] = torch.tensor(float(not d_ok))
    stats["skipped/G"] = torch.tensor(float(not g_ok))
    return stats


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB (Linux)


def grid_inputs(cfg: Config, G: Generator, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fixed latents and noise for sample grids, from their own generator (the training RNG is untouched)."""
    g = torch.Generator().manual_seed(cfg.train.grid_seed)
    n = cfg.train.grid_size
    z = torch.randn(n, G.latent_dim, generator=g)
    noise = [torch.randn(n, 1, s, s, generator=g) for _, s in G.synthesis.noise_shapes(G.max_resolution)]
    return z.to(device), [x.to(device) for x in noise]


@torch.no_grad()
def render_grid(G_ema: Generator, z: torch.Tensor, noise: list[torch.Tensor], resolution: int, alpha: float,
                batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(z), batch):
        out.append(G_ema(z[i:i + batch], resolution, alpha, noise=[x[i:i + batch] for x in noise]).float().cpu())
    return torch.cat(out)


def training_loop(
    cfg: Config,
    source: BatchSource,
    run_dir: str | Path,  # local directory or storage URI
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    resume: str | Path | dict | None = None,
    report: Report | None = None,
    extra_state: dict[str, Any] | None = None,
    stop_after_ticks: int | None = None,
    checkpoint_dir: str | Path | None = None,
    metrics_data: str | None = None,
    log: Callable[[str], None] | None = print,
    on_generator: Callable[[Generator, dict[str, Any], bool], None] | None = None,
) -> LoopResult:
    """Train until ``schedule.total_kimg`` (or ``stop_after_ticks`` ticks of this call).

    ``report(stats, checkpoint_path)`` is called on every rank at each tick end (checkpoint path on rank 0
    when one was written, else None; the callback may move the file away). ``extra_state`` is stored in
    checkpoints (e.g. the MLflow run id). Checkpoints go to ``checkpoint_dir`` (default run_dir/checkpoints).
    The metrics named in ``cfg.metrics`` run on G_ema every ``metrics.kimg`` against ``metrics_data`` (or
    ``metrics.data``) and are added to the tick's stats. ``on_generator(G_ema, stats, done)`` is called on rank 0 at
    each tick end after the metrics (to export the generator, e.g. as an MLflow model).
    """
    device = torch.device(device)
    run_dir = storage.resolve(run_dir)
    ddp = world_size > 1
    is_main = rank == 0
    say = log if (is_main and log is not None) else (lambda _msg: None)
    configure_perf(cfg, device)

    G, D, G_ema = build_models(cfg, device)
    if ddp:
        for t in list(G.parameters()) + list(G.buffers()) + list(D.parameters()):
            dist.broadcast(t.data, src=0)
        G_ema.load_state_dict(G.state_dict())
    # Per-rank training randomness (latents, noise, mixing), distinct from the init seed.
    torch.manual_seed(cfg.train.seed * 1_000_003 + 7919 * (rank + 1))
    random.seed(cfg.train.seed * 31 + rank)

    first = phase_at(cfg, 0, world_size)
    opt_G = make_optimizer(cfg, G, first.lr)
    opt_D = make_optimizer(cfg, D, first.lr * cfg.schedule.d_lr_mult)
    loss = StyleGANLoss(cfg, G, D, device, D_forward=compile_models(G, D) if cfg.perf.compile else None)

    cur_nimg, tick, step = 0, 0, 0
    last_ckpt_nimg = last_metrics_nimg = 0
    prev_phase: Phase | None = None
    extra = dict(extra_state or {})

    if resume is not None:
        ck = resume if isinstance(resume, dict) else ckpt_mod.load_checkpoint(resume, map_location=device)
        G.load_state_dict(ck["G"])
        D.load_state_dict(ck["D"])
        G_ema.load_state_dict(ck["G_ema"])
        opt_G.load_state_dict(ck["opt_G"])
        opt_D.load_state_dict(ck["opt_D"])
        st = ck["state"]
        cur_nimg, tick, step, last_ckpt_nimg = st["cur_nimg"], st["tick"], st["step"], st["cur_nimg"]
        last_metrics_nimg = st.get("metrics_nimg", cur_nimg)
        prev_phase = phase_at(cfg, st["phase_nimg"], world_size) if st.get("phase_nimg") is not None else None
        per_rank = ck["per_rank"][rank] if rank < len(ck["per_rank"]) else None
        if per_rank is not None:
            _set_rng_state(per_rank["rng"], device)
            if per_rank.get("source") is not None and hasattr(source, "load_state_dict"):
                source.load_state_dict(per_rank["source"])
        extra = {**ck.get("extra", {}), **extra}
        say(f"Resumed from {resume if not isinstance(resume, dict) else 'checkpoint'} at kimg {cur_nimg / 1000:.3f}.")

    ckpt_dir = storage.resolve(checkpoint_dir) if checkpoint_dir is not None else storage.join(run_dir, "checkpoints")
    sample_dir = storage.join(run_dir, "samples")
    if is_main:
        storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))
    grid_z, grid_noise = grid_inputs(cfg, G, device)

    total_nimg = int(round(cfg.schedule.total_kimg * 1000))
    repeats = cfg.schedule.minibatch_repeats
    r1_interval = cfg.loss.r1_interval
    ema_halflife = cfg.optim.ema_halflife_kimg * 1000

    it, it_key = None, None
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    stat_sums: dict[str, torch.Tensor] = collections.defaultdict(lambda: torch.zeros([], device=device))
    stat_count = 0
    stat_counts: dict[str, int] = collections.defaultdict(int)
    skipped_run = 0  # consecutive training steps with a skipped D or G update
    max_skipped = cfg.optim.max_skipped_steps
    ticks_this_call = 0
    last_ckpt_path: str | None = None
    last_grid: str | None = None
    history: list[dict[str, Any]] = []
    phase = phase_at(cfg, cur_nimg, world_size)
    done = cur_nimg >= total_nimg

    def save_checkpoint() -> str | None:
        per_rank = {"rng": _rng_state(device),
                    "source": source.state_dict() if hasattr(source, "state_dict") else None}
        gathered = [per_rank]
        if ddp:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, per_rank)
        if not is_main:
            return None
        state = {
            "format": ckpt_mod.FORMAT_VERSION,
            "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict(),
            "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "state": {"cur_nimg": cur_nimg, "tick": tick, "step": step, "phase_nimg": phase_nimg,
                      "metrics_nimg": last_metrics_nimg, "w_avg": G.w_avg.detach().cpu()},
            "per_rank": gathered,
            "config": to_dict(cfg),
            "extra": extra,
        }
        path = ckpt_mod.atomic_save(state, storage.join(ckpt_dir, ckpt_mod.checkpoint_name(cur_nimg)))
        ckpt_mod.prune_checkpoints(ckpt_dir, cfg.train.keep_checkpoints)
        return path

    phase_nimg = cur_nimg
    while not done:
        # The schedule is evaluated once per group of minibatch_repeats steps (official training loop).
        phase_nimg = cur_nimg
        phase = phase_at(cfg, cur_nimg, world_size)
        if cfg.optim.reset_on_lod_change and lod_changed(prev_phase, phase):
            opt_G.state = collections.defaultdict(dict)
            opt_D.state = collections.defaultdict(dict)
        prev_phase = phase
        if it_key != (phase.resolution, phase.batch_per_gpu):
            it = source.batches(phase.resolution, phase.batch_per_gpu)
            it_key = (phase.resolution, phase.batch_per_gpu)
        for group in opt_G.param_groups:
            group["lr"] = phase.lr
        for group in opt_D.param_groups:
            group["lr"] = phase.lr * cfg.schedule.d_lr_mult
        ctx = StepContext(phase.resolution, phase.alpha, phase.batch_per_gpu)
        ema_beta = 0.5 ** (phase.batch / ema_halflife) if ema_halflife > 0 else 0.0

        for _ in range(repeats):
            reals_u8 = next(it)
            if reals_u8.shape[-1] != phase.resolution or reals_u8.shape[0] != phase.batch_per_gpu:
                raise RuntimeError(f"data source returned {list(reals_u8.shape)} for resolution {phase.resolution} "
                                   f"and batch {phase.batch_per_gpu}")
            reals = fade_reals(to_float(reals_u8.to(device, non_blocking=True)), phase.alpha)
            if cfg.perf.channels_last:
                reals = reals.contiguous(memory_format=torch.channels_last)

            stats = train_step(G, D, G_ema, opt_G, opt_D, loss, reals, ctx, ema_beta,
                               reg_gain=_reg_gain(step, r1_interval), world_size=world_size)
            cur_nimg += phase.batch
            step += 1

            skips = {k: int(stats.pop(k).item()) for k in ("skipped/D", "skipped/G")}
            for k, v in skips.items():
                stat_counts[k] += v
            skipped_run = skipped_run + 1 if any(skips.values()) else 0
            if skipped_run >= max_skipped:
                kept = ckpt_mod.latest_checkpoint(ckpt_dir)
                where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been written yet"
                raise NonFiniteLossError(
                    f"Training stopped: {skipped_run} consecutive steps up to kimg {cur_nimg / 1000:.3f} had NaN or "
                    f"infinite gradients and were skipped (optim.max_skipped_steps); {where}.")
            if not any(skips.values()):  # a skipped step's losses are not finite: they stay out of the tick means
                for k, v in stats.items():
                    stat_sums[k] += v.float()
                stat_count += 1
            if cur_nimg >= total_nimg:
                break

        done = cur_nimg >= total_nimg
        if not (done or cur_nimg >= tick_start_nimg + phase.tick_kimg * 1000):
            continue

        # ---- tick end: one host sync for all loss statistics of the tick ----
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.time()
        tick += 1
        ticks_this_call += 1
        sec = now - tick_start_time
        kimg_tick = (cur_nimg - tick_start_nimg) / 1000
        means = {k: (v / max(stat_count, 1)) for k, v in stat_sums.items()}
        if ddp and means:
            keys = sorted(means)
            t = torch.stack([means[k] for k in keys])
            dist.all_reduce(t)
            means = dict(zip(keys, t / world_size))
        means = {k: float(v.item()) for k, v in means.items()}
        stats_out = {
            "tick": tick, "kimg": cur_nimg / 1000, "cur_nimg": cur_nimg, "resolution": phase.resolution,
            "alpha": phase.alpha, "lod": phase.lod, "batch": phase.batch, "lr": phase.lr,
            "sec_per_tick": sec, "sec_per_kimg": sec / max(kimg_tick, 1e-9),
            "img_per_sec": kimg_tick * 1000 / max(sec, 1e-9),
            "peak_mem_gb": _peak_memory_gb(device), **means,
            "skipped_steps/D": stat_counts["skipped/D"], "skipped_steps/G": stat_counts["skipped/G"],
        }
        say(format_tick(stats_out))

        grid_path = None
        snap = cfg.train.image_snapshot_ticks
        if is_main and snap and (tick % snap == 0 or done):
            imgs = render_grid(G_ema, grid_z, grid_noise, phase.resolution, phase.alpha)
            grid_path = save_grid(imgs, storage.join(sample_dir, f"grid-{cur_nimg:010d}.png"))
            last_grid = grid_path
            stats_out["grid"] = str(grid_path)
        if metrics_due(cfg, cur_nimg, last_metrics_nimg, done):  # collective: every rank takes part
            stats_out.update(run_training_metrics(
                cfg, G_ema, cfg.metrics.data or metrics_data, cur_nimg, rank=rank, world_size=world_size,
                device=device, gather=torch_distributed_gather if ddp else None, log=say))
            last_metrics_nimg = cur_nimg
        if is_main and on_generator is not None:
            on_generator(G_ema, stats_out, done)
        stopping = done or (stop_after_ticks is not None and ticks_this_call >= stop_after_ticks)
        ckpt_path = None
        if stopping or cur_nimg - last_ckpt_nimg >= cfg.train.checkpoint_kimg * 1000:
            ckpt_path = save_checkpoint()
            last_ckpt_nimg = cur_nimg
            if ckpt_path is not None:
                last_ckpt_path = ckpt_path
        history.append(stats_out)
        if report is not None:
            report(stats_out, ckpt_path)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stat_sums.clear()
        stat_counts.clear()
        stat_count = 0
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        if stopping:
            break

    if is_main and done and last_ckpt_path is None:
        last_ckpt_path = ckpt_mod.latest_checkpoint(ckpt_dir)
    return LoopResult(cur_nimg=cur_nimg, ticks=tick, checkpoint=last_ckpt_path, grid=last_grid,
                      finished=cur_nimg >= total_nimg, history=history)


def format_tick(s: dict[str, Any]) -> str:
    losses = "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in s.items() if k.startswith("loss/"))
    kimg = f"{s['kimg']:.1f}" if s["kimg"] >= 100 else f"{s['kimg']:.3f}"
    return (f"tick {s['tick']:<5d} kimg {kimg:<9} res {s['resolution']:<5d} alpha {s['alpha']:.3f}  "
            f"batch {s['batch']:<4d} sec/tick {s['sec_per_tick']:<7.1f} sec/kimg {s['sec_per_kimg']:<8.2f} "
            f"img/s {s['img_per_sec']:<8.1f} mem {s['peak_mem_gb']:.2f}GB  {losses}")
