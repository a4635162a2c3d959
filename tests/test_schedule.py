import pytest

from stylegan_dist.config import build_config
from stylegan_dist.schedule import format_schedule, lod_changed, phase_at


@pytest.fixture(scope="module")
def cfg():
    return build_config()


@pytest.mark.parametrize("kimg,res,alpha,batch,lr", [
    (0, 8, 1.0, 128, 0.001),            # start at 8x8
    (599.999, 8, 1.0, 128, 0.001),      # end of the first stabilisation
    (600.001, 16, 0.0, 128, 0.001),     # resolution switch: 16x16 fades in
    (900, 16, 0.5, 128, 0.001),         # mid-fade
    (1200, 16, 1.0, 128, 0.001),        # fade done
    (1800.001, 32, 0.0, 64, 0.001),
    (3000.001, 64, 0.0, 32, 0.001),
    (4200.001, 128, 0.0, 16, 0.0015),
    (5400.001, 256, 0.0, 8, 0.002),
    (6600.001, 512, 0.0, 4, 0.003),
    (7800.001, 1024, 0.0, 4, 0.003),
    (8100, 1024, 0.5, 4, 0.003),
    (8400, 1024, 1.0, 4, 0.003),
    (25000, 1024, 1.0, 4, 0.003),       # the end
])
def test_schedule_values(cfg, kimg, res, alpha, batch, lr):
    p = phase_at(cfg, int(round(kimg * 1000)))
    assert p.resolution == res
    assert p.alpha == pytest.approx(alpha, abs=1e-5)
    assert p.batch_per_gpu == batch and p.batch == batch
    assert p.lr == lr


def test_global_batch_scales_with_workers(cfg):
    p = phase_at(cfg, 0, world_size=8)
    assert p.batch_per_gpu == 128 and p.batch == 1024


def test_lod_change_detects_fade_start_and_end(cfg):
    stable = phase_at(cfg, 500_000)
    fading = phase_at(cfg, 700_000)
    fading2 = phase_at(cfg, 800_000)
    stable16 = phase_at(cfg, 1_300_000)
    assert lod_changed(stable, fading)
    assert not lod_changed(fading, fading2)
    assert lod_changed(fading2, stable16)
    assert not lod_changed(None, stable)


def test_schedule_is_pure(cfg):
    assert phase_at(cfg, 123_456) == phase_at(cfg, 123_456)


def test_schedule_table_lists_each_segment(cfg):
    text = format_schedule(cfg)
    assert "7800 -    8400   1024  fade-in" in text
    assert "8400 -   25000   1024  stable" in text
    assert len(text.splitlines()) == 1 + 15


def test_start_at_4_and_no_fade():
    cfg = build_config(set_args=["model.resolution=16", "schedule.start_resolution=4", "schedule.fade_kimg=0",
                                 "schedule.stabilise_kimg=10"])
    assert phase_at(cfg, 0).resolution == 4
    assert phase_at(cfg, 10_001).resolution == 8 and phase_at(cfg, 10_001).alpha == 1.0
    assert phase_at(cfg, 25_000).resolution == 16
