"""Ray Train layer, started the way users start it: a cluster from `ray start --head` (token authentication on)
and the training command as a subprocess connected through RAY_ADDRESS. `ray job submit` on two nodes with object
storage and a tracking server: tests/test_on_cluster.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN

from stylegan_dist.ray_train import run_checkpoints
from stylegan_dist.tracking import image_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]



@pytest.fixture
def run_config(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_RUN)
    return p


def _train(cluster, *args, timeout=600, env_extra=None):
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"], **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "stylegan_dist.train", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _mlflow(storage: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{storage.resolve() / 'mlflow.db'}")


def _metas(run_dir: Path) -> list[dict]:
    """The run's registered checkpoints' metadata, through Ray's Result.from_path."""
    return run_checkpoints(str(run_dir))


@pytest.mark.parametrize("workers", [2])  # one worker: every sweep trial in test_sweep.py
def test_train_on_cluster(cluster, dataset, run_config, tmp_path, workers):
    storage = tmp_path / "runs"
    r = _train(cluster, "--config", run_config, "--data", dataset, "--workers", workers, "--storage", storage,
               "--run-name", f"w{workers}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Training finished" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout
    run_dir = storage / f"w{workers}"
    metas = _metas(run_dir)
    assert max(m["cur_nimg"] for m in metas) == 320  # 0.32 kimg exactly: batch 8 x workers divides it
    assert len(metas) <= 3  # newest K kept
    client = _mlflow(storage)
    run = client.get_run(metas[0]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.resolution"] == "16" and run.data.params["workers"] == str(workers)
    kimg = client.get_metric_history(run.info.run_id, "progress/kimg")
    assert len(kimg) >= 4 and max(m.value for m in kimg) == pytest.approx(0.32)
    res = {m.value for m in client.get_metric_history(run.info.run_id, "progress/resolution")}
    assert res == {8.0, 16.0}
    for key in ("loss/G", "loss/D", "loss/R1", "speed/img_per_sec", "speed/sec_per_kimg", "memory/peak_gb",
                "progress/alpha", "progress/lod", "scores/real", "skipped_steps/D"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "images", "checkpoint"}
    # the batch per tick follows the schedule times the number of workers
    assert {m.value for m in client.get_metric_history(run.info.run_id, "progress/batch")} == {8.0 * workers}
    # for the UI: sample grids as time-stepped images and the node's system metrics, at the same steps (images seen)
    steps = sorted(m.step for m in kimg)
    assert image_steps(client, run.info.run_id, "samples") == steps
    cpu = client.get_metric_history(run.info.run_id, "system/node_0/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == steps  # local rank 0 of the node only: one value per tick
    assert not [k for k in run.data.metrics if k.startswith("system/") and not k.startswith("system/node_0/")]
    # G_ema registered under the run's name at the end, loadable by MLflow and by our commands
    assert run.data.tags["model.uri"] == f"models:/w{workers}/1" and f"models:/w{workers}/1" in r.stdout
    version = client.get_model_version(f"w{workers}", "1")
    assert version.run_id == run.info.run_id and version.tags["kimg"] == "0.32"
    import mlflow.pyfunc
    import numpy as np

    from stylegan_dist.mlflow_model import _tracking

    with _tracking(f"sqlite:///{storage.resolve() / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(f"models:/w{workers}/1")
    assert [s.shape for s in model.metadata.get_input_schema().inputs] == [(-1, 16)]
    images = model.predict(np.random.RandomState(1).randn(2, 16).astype(np.float32))
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all()
    g = subprocess.run([sys.executable, "-m", "stylegan_dist.generate", "--model", f"models:/w{workers}/1",
                        "--seeds", "0-3", "--out", str(tmp_path / "gen.png"), "--device", "cpu"],
                       env=dict(os.environ, STYLEGAN_DIST_STORAGE=str(storage)), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert g.returncode == 0 and "at 16x16 (kimg 0.3" in g.stdout, g.stderr[-3000:]
    assert (tmp_path / "gen.png").read_bytes()[:4] == b"\x89PNG"
    # figures and evaluate take the registered model too, and log into its training run at its step
    env = dict(os.environ, STYLEGAN_DIST_STORAGE=str(storage))
    f = subprocess.run([sys.executable, "-m", "stylegan_dist.figures", "all", "--model", "models:/w2/1", "--outdir",
                        str(tmp_path / "figs"), "--samples", "4", "--cell", "16", "--device", "cpu"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert f.returncode == 0, f.stderr[-3000:]
    for key in ("figures/style_mixing", "figures/noise", "figures/truncation"):
        assert image_steps(client, run.info.run_id, key) == [320], key
    from stylegan_dist.metrics.testing import write_random_weight_files

    w = write_random_weight_files(tmp_path / "weights")
    e = subprocess.run([sys.executable, "-m", "stylegan_dist.evaluate", "--model", "models:/w2/1", "--metrics",
                        "ppl_wend", "--num", "4", "--batch", "4", "--no-ray", "--device", "cpu", "--vgg16",
                        str(w["vgg16"]), "--lpips", str(w["lpips"])], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "metrics/ppl_wend")] == [320]


def test_killed_worker_resumes_from_checkpoint(cluster, dataset, run_config, tmp_path):
    storage, pids = tmp_path / "runs", tmp_path / "pids"
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"], STYLEGAN_DIST_PID_DIR=str(pids))
    proc = subprocess.Popen([sys.executable, "-m", "stylegan_dist.train", "--config", str(run_config), "--data",
                             str(dataset), "--workers", "2", "--storage", str(storage), "--run-name", "kill",
                             "--set", "schedule.total_kimg=0.64"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = storage / "kill"
    deadline = time.time() + 300
    # wait until Ray has registered a checkpoint (every worker made that report), then kill rank 1
    while time.time() < deadline and not _metas(run_dir):
        time.sleep(0.2)
    assert _metas(run_dir), "no checkpoint was registered"
    first = _metas(run_dir)
    victim = int((pids / "rank1.pid").read_text().split()[0])
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "Resumed from checkpoint at kimg" in out
    metas = _metas(run_dir)
    assert max(m["cur_nimg"] for m in metas) == 640
    assert {m["mlflow_run_id"] for m in metas + first} == {first[0]["mlflow_run_id"]}
    # the restarted workers continued from a checkpoint, not from zero: no tick repeated kimg 0.064
    client = _mlflow(storage)
    steps = [m.step for m in client.get_metric_history(first[0]["mlflow_run_id"], "progress/kimg")]
    assert steps.count(64) == 1 and max(steps) == 640
    assert len(client.search_runs([client.get_experiment_by_name("stylegan_dist").experiment_id])) == 1


def test_stop_and_rerun_continues(cluster, dataset, run_config, tmp_path):
    storage = tmp_path / "runs"
    r1 = _train(cluster, "--config", run_config, "--data", dataset, "--workers", 1, "--storage", storage,
                "--max-ticks", 2)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    assert "stopped at kimg 0.128" in r1.stdout
    run_dir = storage / "tiny"
    run_id = _metas(run_dir)[0]["mlflow_run_id"]
    r2 = _train(cluster, "--config", run_config, "--data", dataset, "--workers", 1, "--storage", storage)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "Continuing" in r2.stdout and "from kimg 0.128" in r2.stdout and "Resumed from checkpoint" in r2.stdout
    assert max(m["cur_nimg"] for m in _metas(run_dir)) == 320
    assert {m["mlflow_run_id"] for m in _metas(run_dir)} == {run_id}
    assert _mlflow(storage).get_run(run_id).info.status == "FINISHED"
    # --restart moves the old run aside and starts a new one
    r3 = _train(cluster, "--config", run_config, "--data", dataset, "--workers", 1, "--storage", storage,
                "--restart", "--max-ticks", 1)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert list(storage.glob("tiny.old-*"))
    assert {m["mlflow_run_id"] for m in _metas(run_dir)} != {run_id}


def test_bad_inputs_one_sentence_and_nothing_written(cluster, dataset, run_config, tmp_path):
    storage = tmp_path / "runs"
    empty = tmp_path / "not_a_dataset"
    empty.mkdir()
    cases = [
        (["--data", tmp_path / "missing"], "does not exist"),
        (["--data", empty], "manifest"),
        (["--data", dataset, "--set", "generator.mapping_layer=2"], "did you mean 'generator.mapping_layers'"),
        (["--data", dataset, "--workers", 64], "do not fit the Ray cluster"),
        (["--data", dataset, "--gpu"], "GPU"),
    ]
    for args, text in cases:
        r = _train(cluster, "--config", run_config, "--storage", storage, *args, timeout=300)
        assert r.returncode != 0, args
        err = r.stderr.strip().splitlines()
        assert err and err[-1].startswith("error: ") and text in err[-1], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert not storage.exists(), f"{args} wrote {list(storage.rglob('*'))}"


def _ddp_step_worker(config):
    """One D+G step on each worker's share of a fixed batch; rank 0 saves grads and params."""
    import ray.train
    import torch

    from stylegan_dist.config import from_dict

    ctx = ray.train.get_context()
    torch.set_num_threads(1)
    out = _reference_steps(from_dict(config["cfg"]), config["batch"], ctx.get_world_rank(), ctx.get_world_size())
    if ctx.get_world_rank() == 0:
        torch.save(out, config["out"])


def _reference_steps(cfg, batch, rank, world):
    """Two steps, 8x8 (the 16x16 block inactive) then 16x16 mid-fade; each rank takes its rows of a
    global batch of ``batch`` reals and latents."""
    import torch

    from stylegan_dist.loop import build_models, make_optimizer, train_step
    from stylegan_dist.loss import StepContext, StyleGANLoss

    b = batch // world
    G, D, G_ema = build_models(cfg, torch.device("cpu"))
    # The constant input starts at ones (official): instance norm of a spatially constant map has
    # rounding-noise gradients, which no two summation orders reproduce. Perturb it, the same on all ranks.
    with torch.no_grad():
        G.synthesis.const.add_(0.1 * torch.randn(G.synthesis.const.shape, generator=torch.Generator().manual_seed(9)))
    opt_G, opt_D = make_optimizer(cfg, G, 1e-3), make_optimizer(cfg, D, 1e-3)
    loss = StyleGANLoss(cfg, G, D, "cpu")
    g = torch.Generator().manual_seed(5)
    draws = iter([torch.randn(batch, cfg.model.latent_dim, generator=g) for _ in range(4)])
    loss.sample_z = lambda n: next(draws)[rank * n:(rank + 1) * n]
    grads = []
    for res, alpha in [(8, 1.0), (16, 0.5)]:
        reals = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
        train_step(G, D, G_ema, opt_G, opt_D, loss, reals[rank * b:(rank + 1) * b], StepContext(res, alpha, b),
                   0.9, world_size=world)
        grads.append({n: p.grad.clone() for n, p in list(G.named_parameters()) + list(D.named_parameters())
                      if p.grad is not None})
    return {"grads": grads, "G": G.state_dict(), "D": D.state_dict(), "G_ema": G_ema.state_dict()}


def test_ddp_two_workers_equal_one_worker_on_double_batch(cluster, tmp_path):
    """Gradients averaged over 2 workers x batch b equal those of 1 worker x 2b, with part of the
    networks inactive. Minibatch stddev groups within each worker's batch, as in the official multi-GPU
    code, so it is off here; noise and mixing draw per-rank randomness, so they are off too."""
    import ray
    import ray.cloudpickle as cloudpickle
    import ray.train
    from conftest import tiny_config
    from ray.train.torch import TorchConfig, TorchTrainer

    from stylegan_dist.config import to_dict

    cfg = tiny_config("generator.use_noise=false", "generator.mixing_prob=0", "discriminator.mbstd_group_size=0",
                      resolution=16)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(address=cluster["address"], ignore_reinit_error=True)
    try:
        trainer = TorchTrainer(
            _ddp_step_worker,
            train_loop_config={"cfg": to_dict(cfg), "batch": 8, "out": str(tmp_path / "ddp.pt")},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "storage")),
        )
        trainer.fit()
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    two = torch.load(tmp_path / "ddp.pt")
    one = _reference_steps(cfg, 8, 0, 1)
    for step, (g1, g2) in enumerate(zip(one["grads"], two["grads"])):
        assert g1.keys() == g2.keys()
        if step == 0:
            assert not any(k.startswith("synthesis.blocks.1.") for k in g1)  # 16x16 block inactive at 8x8
        for k in g1:
            assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6), (step, k)
    # Parameters after the Adam steps: Adam turns each gradient into about +-lr, so entries whose gradient is
    # at rounding-noise level (|g| < 1e-5) may legitimately step either way; all others must agree.
    # (G and D parameter names do not collide: G's all start with mapping. or synthesis.)
    for key in ("G", "D"):
        for k, v in one[key].items():
            mask = torch.ones_like(v, dtype=torch.bool)
            for g in one["grads"]:
                if k in g:
                    mask &= g[k].abs() > 1e-5
            assert torch.allclose(v[mask], two[key][k][mask], rtol=1e-4, atol=1e-6), (key, k)
    assert torch.allclose(one["G"]["w_avg"], two["G"]["w_avg"], atol=1e-7)  # averaged over ranks
