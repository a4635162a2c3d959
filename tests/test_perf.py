"""Speed switches (bf16 autocast, torch.compile, channels-last) train the same model as the fp32 path,
and the benchmark command works on CPU."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, tiny_config

from stylegan_dist.bench import _FlopCount
from stylegan_dist.loop import build_models, compile_models, make_optimizer, train_step
from stylegan_dist.loss import StepContext, StyleGANLoss
from stylegan_dist.networks import EqualizedConv2d

STEPS = 4
LR = 1e-3  # the paper's learning rate up to 64x64


def run_steps(*switches, steps=STEPS, resolution=16, alpha=1.0):
    """``steps`` training steps from a fixed seed; returns per-step losses and G_ema images for fixed inputs."""
    cfg = tiny_config("schedule.start_resolution=16", *switches, resolution=16)
    torch.manual_seed(0)
    G, D, G_ema = build_models(cfg, torch.device("cpu"))
    # The constant input starts at ones (official), so the first instance norm divides a spatially constant
    # map by sqrt(eps): after one Adam step its output is the normalised +-lr pattern of the update, which
    # no two float orderings reproduce. Start from a perturbed constant to compare precisions meaningfully.
    with torch.no_grad():
        G.synthesis.const.add_(0.1 * torch.randn(G.synthesis.const.shape, generator=torch.Generator().manual_seed(9)))
        G_ema.load_state_dict(G.state_dict())
    opt_G, opt_D = make_optimizer(cfg, G, LR), make_optimizer(cfg, D, LR)
    loss = StyleGANLoss(cfg, G, D, "cpu", D_forward=compile_models(G, D) if cfg.perf.compile else None)
    g = torch.Generator().manual_seed(1)
    loss.sample_z = lambda n: torch.randn(n, cfg.model.latent_dim, generator=g)
    data = torch.Generator().manual_seed(2)
    torch.manual_seed(3)
    history = []
    for _ in range(steps):
        reals = torch.rand(8, 3, resolution, resolution, generator=data) * 2 - 1
        if cfg.perf.channels_last:
            reals = reals.contiguous(memory_format=torch.channels_last)
        stats = train_step(G, D, G_ema, opt_G, opt_D, loss, reals, StepContext(resolution, alpha, 8), 0.9)
        history.append({k: float(v) for k, v in stats.items()})
    zg = torch.Generator().manual_seed(4)
    z = torch.randn(6, cfg.model.latent_dim, generator=zg)
    noise = [torch.randn(6, 1, s, s, generator=zg) for _, s in G_ema.synthesis.noise_shapes(resolution)]
    with torch.no_grad():
        images = G_ema(z, resolution, alpha, noise=noise).float()
    return history, images


@pytest.fixture(scope="module")
def reference():
    return run_steps()


def _close(a, b, loss_tol, img_tol):
    (ha, ia), (hb, ib) = a, b
    for sa, sb in zip(ha, hb):
        for k in sa:
            assert abs(sa[k] - sb[k]) <= loss_tol * max(1.0, abs(sa[k])), (k, sa[k], sb[k])
    assert (ia - ib).abs().max().item() <= img_tol


def test_fp32_path_is_deterministic(reference):
    _close(reference, run_steps(), 0.0, 0.0)


def test_bf16_autocast_stays_close_to_fp32(reference):
    # Measured after 4 steps: losses within 0.01, G_ema images within 0.052 (their values span about +-6).
    # Stated tolerance: 0.02 on losses (relative above 1), 0.1 on images; fp32 master weights and R1 in fp32.
    _close(reference, run_steps("perf.precision=bf16"), 0.02, 0.1)


def test_channels_last_matches_fp32(reference):
    _close(reference, run_steps("perf.channels_last=true"), 1e-4, 1e-4)


@pytest.fixture
def eager_rng_under_compile():
    # Inductor draws the noise inputs from its own RNG (same distribution, another stream); with
    # fallback_random it uses eager's, so compiled and eager runs see the same noise and can be compared.
    # (inductor's own patch(): monkeypatch's undo deletes the key from inductor's config module.)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


@pytest.mark.slow
def test_compile_matches_eager(reference, eager_rng_under_compile):
    _close(reference, run_steps("perf.compile=true"), 1e-4, 1e-4)  # measured: 0 on losses, 2e-5 on images


@pytest.mark.slow
def test_compile_during_fade_uses_tensor_alpha(eager_rng_under_compile):
    eager = run_steps(steps=2, alpha=0.5)
    compiled = run_steps("perf.compile=true", steps=2, alpha=0.5)
    _close(eager, compiled, 1e-4, 1e-4)


def test_flop_counter_counts_convolutions():
    conv = EqualizedConv2d(8, 16, 3)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with _FlopCount() as c:
        conv(x)
    assert c.total == 2 * 2 * 8 * 16 * 9 * 10 * 10  # 2 FLOP per multiply-add
    with _FlopCount() as c:
        conv(x).sum().backward()
    assert c.total == 3 * 2 * 2 * 8 * 16 * 9 * 10 * 10  # forward + input grad + weight grad


def test_bench_cli_json():
    args = [sys.executable, "-m", "stylegan_dist.bench", "--resolutions", "8,16", "--batch", "4", "--steps", "2",
            "--warmup", "1", "--json", "--device", "cpu"] + [x for kv in TINY for x in ("--set", kv)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["device"] == "cpu" and out["precision"] == "tf32"
    rows = out["results"]
    assert [row["resolution"] for row in rows] == [8, 16]
    for row in rows:
        assert row["batch"] == 4 and row["img_per_sec"] > 0 and row["finite"]
        assert row["sec_per_kimg"] == pytest.approx(1000 / row["img_per_sec"])
        assert row["flop_per_img"] > 0 and row["tflops"] > 0
    assert rows[1]["flop_per_img"] > rows[0]["flop_per_img"]


def test_bench_full_size_flops_on_meta():
    from stylegan_dist.bench import count_flops
    from stylegan_dist.config import build_config

    f256 = count_flops(build_config(set_args=["model.resolution=256"]), 2, torch.device("meta"))
    f1024 = count_flops(build_config(set_args=["model.resolution=1024"]), 2, torch.device("meta"))
    assert 5e11 < f256 < f1024 < 1.5e12


def test_bench_bad_input():
    r = subprocess.run([sys.executable, "-m", "stylegan_dist.bench", "--resolutions", "12"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --resolutions must be powers of two")
