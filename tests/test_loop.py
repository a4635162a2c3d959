import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_SCHEDULE, random_images, tiny_config

from stylegan_dist import checkpoint as ckpt_mod
from stylegan_dist.data import TensorSource
from stylegan_dist.loop import NonFiniteLossError, build_models, training_loop
from stylegan_dist.loss import StyleGANLoss


def _cfg(*extra):
    return tiny_config(*TINY_SCHEDULE, *extra)


def _state(path):
    ck = ckpt_mod.load_checkpoint(path)
    return ck


def test_loop_advances_nimg_exactly_and_grows(tmp_path):
    cfg = _cfg()
    res = training_loop(cfg, TensorSource(random_images()), tmp_path, log=None)
    assert res.finished
    # batch 8, 4 minibatch repeats per schedule evaluation: nimg is a multiple of 8 and stops at 400
    assert res.cur_nimg == 400
    resolutions = [h["resolution"] for h in res.history]
    assert resolutions[0] == 8 and resolutions[-1] == 32 and 16 in resolutions
    # the schedule switches at 64 nimg (16 fades in) and 192 nimg (32 fades in)
    for h in res.history:
        expect = 8 if h["cur_nimg"] <= 64 else 16 if h["cur_nimg"] <= 192 else 32
        assert h["resolution"] in (expect, expect // 2)  # a tick reports the phase of its last group
    assert Path(res.checkpoint).exists() and Path(res.grid).exists()
    assert len(ckpt_mod.list_checkpoints(tmp_path / "checkpoints")) <= cfg.train.keep_checkpoints
    ck = _state(res.checkpoint)
    assert ck["state"]["cur_nimg"] == 400
    assert set(ck) >= {"G", "D", "G_ema", "opt_G", "opt_D", "state", "per_rank", "config"}
    assert (tmp_path / "config.yaml").exists()
    from PIL import Image
    im = Image.open(res.grid)
    assert im.size[0] >= 64 and im.mode == "RGB"


def test_save_load_continue_is_bit_identical(tmp_path):
    cfg = _cfg()
    full = training_loop(cfg, TensorSource(random_images(), seed=3), tmp_path / "a", log=None)
    part = training_loop(cfg, TensorSource(random_images(), seed=3), tmp_path / "b", log=None, stop_after_ticks=5)
    assert not part.finished and 0 < part.cur_nimg < 400
    rest = training_loop(cfg, TensorSource(random_images(), seed=3), tmp_path / "b", log=None,
                         resume=part.checkpoint)
    assert rest.finished and rest.cur_nimg == full.cur_nimg
    a, b = _state(full.checkpoint), _state(rest.checkpoint)
    for key in ("G", "D", "G_ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    assert a["state"]["tick"] == b["state"]["tick"]


def _plant_nan_g_grad(monkeypatch, bad_steps):
    """G's gradients become NaN at the 1-based G steps in ``bad_steps`` (a set, or a predicate)."""
    orig = StyleGANLoss.accumulate_gradients
    calls = {"n": 0}

    def poisoned(self, phase, reals, ctx, gain=1.0):
        stats = orig(self, phase, reals, ctx, gain)
        if phase == "G":
            calls["n"] += 1
            if (bad_steps(calls["n"]) if callable(bad_steps) else calls["n"] in bad_steps):
                next(p for p in self.G.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
                stats["loss/G"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(StyleGANLoss, "accumulate_gradients", poisoned)


def test_non_finite_gradient_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _plant_nan_g_grad(monkeypatch, {7, 30, 31})
    cfg = _cfg("optim.reset_on_lod_change=false", "optim.max_skipped_steps=3")
    res = training_loop(cfg, TensorSource(random_images()), tmp_path, log=None)
    assert res.finished and res.cur_nimg == 400  # 50 steps of 8 images
    assert sum(h["skipped_steps/G"] for h in res.history) == 3
    assert sum(h["skipped_steps/D"] for h in res.history) == 0
    assert [h["tick"] for h in res.history if h["skipped_steps/G"]] == [2, 8]  # steps 5-8 and 29-32 of 4 per tick
    assert all(math.isfinite(h["loss/G"]) for h in res.history)  # skipped steps stay out of the tick means
    ck = _state(res.checkpoint)
    # the skipped updates were not applied: Adam took 47 G steps and 50 D steps
    assert max(int(s["step"]) for s in ck["opt_G"]["state"].values()) == 47
    assert max(int(s["step"]) for s in ck["opt_D"]["state"].values()) == 50
    assert all(torch.isfinite(t).all() for t in ck["G"].values())


def test_consecutive_non_finite_steps_stop_the_run_and_keep_checkpoint(tmp_path, monkeypatch):
    _plant_nan_g_grad(monkeypatch, lambda n: n > 20)
    cfg = _cfg("train.checkpoint_kimg=0.05", "optim.max_skipped_steps=3")
    with pytest.raises(NonFiniteLossError, match=r"^Training stopped: 3 consecutive steps up to kimg 0\.184 had NaN "
                       r"or infinite gradients and were skipped \(optim\.max_skipped_steps\); the last good "
                       r"checkpoint is .*ckpt-0000000128"):
        training_loop(cfg, TensorSource(random_images()), tmp_path, log=None)
    kept = ckpt_mod.list_checkpoints(tmp_path / "checkpoints")
    assert kept and ckpt_mod.load_checkpoint(kept[-1])["state"]["cur_nimg"] == 128
    assert all(torch.isfinite(t).all() for t in ckpt_mod.load_checkpoint(kept[-1])["G"].values())


def test_optimizer_state_resets_at_fade_start(tmp_path):
    # Groups of 4 steps x 8 images start at nimg 0, 32, 64 (lod still 3.0: stable) and 96 (fading): the
    # reset happens at 96 and one step (96 -> 104) follows before total_kimg.
    cfg = _cfg("schedule.total_kimg=0.104")
    res = training_loop(cfg, TensorSource(random_images()), tmp_path, log=None)
    ck = _state(res.checkpoint)
    assert {int(s["step"]) for s in ck["opt_G"]["state"].values()} == {1}
    assert {int(s["step"]) for s in ck["opt_D"]["state"].values()} == {1}
    cfg_keep = _cfg("schedule.total_kimg=0.104", "optim.reset_on_lod_change=false")
    res = training_loop(cfg_keep, TensorSource(random_images()), tmp_path / "keep", log=None)
    assert max(int(s["step"]) for s in _state(res.checkpoint)["opt_G"]["state"].values()) == 13


def test_discriminator_learning_rate_multiplier(tmp_path):
    # one step of Adam with beta1 = 0 moves every weight with a gradient by about its group's lr
    cfg = _cfg("schedule.total_kimg=0.008", "schedule.lr_base=0.002", "schedule.d_lr_mult=3")
    G0, D0, _ = build_models(cfg, torch.device("cpu"))  # the loop's initial weights (seeded)
    res = training_loop(cfg, TensorSource(random_images()), tmp_path, log=None)
    ck = _state(res.checkpoint)
    assert [g["lr"] for g in ck["opt_G"]["param_groups"]] == [0.002]
    assert [g["lr"] for g in ck["opt_D"]["param_groups"]] == [pytest.approx(0.006)]
    d_move = max((ck["D"][k] - v).abs().max().item() for k, v in D0.state_dict().items())
    g_move = max((ck["G"][k] - v).abs().max().item() for k, v in G0.state_dict().items() if "w_avg" not in k)
    assert d_move == pytest.approx(0.006, rel=0.05) and g_move == pytest.approx(0.002, rel=0.05)


def test_checkpoint_write_is_atomic(tmp_path):
    ckpt_mod.atomic_save({"format": 1, "x": 1}, tmp_path / "ckpt-0000000001.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-0000000001.pt"]
    (tmp_path / "ckpt-0000000002.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt_mod.CheckpointError, match="could not be read"):
        ckpt_mod.load_checkpoint(tmp_path / "ckpt-0000000002.pt")


@pytest.mark.slow
def test_metrics_run_periodically_in_training(tmp_path):
    from stylegan_dist.metrics.testing import make_synthetic_dataset, write_random_weight_files

    w = write_random_weight_files(tmp_path / "weights")
    data = make_synthetic_dataset(tmp_path / "data", num_images=64, resolution=32)
    cfg = _cfg("metrics.names=ppl_wend,fid50k", "metrics.kimg=0.2", "metrics.num=16", "metrics.batch_size=8",
               f"metrics.vgg16_weights={w['vgg16']}", f"metrics.lpips_weights={w['lpips']}",
               f"metrics.inception_weights={w['inception']}", f"metrics.cache_dir={tmp_path / 'cache'}")
    res = training_loop(cfg, TensorSource(random_images()), tmp_path / "run", log=None, metrics_data=data)
    with_metrics = [h for h in res.history if "ppl_wend" in h]
    # due at the first tick end past 0.2 kimg and at the end
    assert [h["cur_nimg"] for h in with_metrics] == [224, 400]
    assert all(h["ppl_wend"] > 0 and h["fid50k"] > 0 for h in with_metrics)
    assert _state(res.checkpoint)["state"]["metrics_nimg"] == 400
