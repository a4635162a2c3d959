"""Entry points run as subprocesses, the way users run them (no Ray here: --no-ray / --dry-run)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


def run(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_summary_json_defaults():
    r = run("stylegan_dist.summary", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["G_params"] == 26_219_627
    assert s["G_mapping_params"] + s["G_synthesis_params"] == s["G_params"]
    assert s["D_params"] > 20e6 and s["num_ws"] == 18 and len(s["layers"]) == 9
    t = json.loads(run("stylegan_dist.summary", "--json", "--set", "generator.architecture=traditional").stdout)
    assert abs(t["G_params"] / 23.1e6 - 1) < 0.01 and t["G_mapping_params"] == 0


def test_summary_table_and_bad_key():
    r = run("stylegan_dist.summary", "--preset", "E")
    assert r.returncode == 0 and "26,219,627" in r.stdout and "1024" in r.stdout
    bad = run("stylegan_dist.summary", "--set", "model.resolutoin=64")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: Unknown config key 'model.resolutoin' in --set (did you mean 'model.resolution'?).")


@pytest.mark.parametrize("module", ["stylegan_dist.train", "stylegan_dist.summary", "stylegan_dist.bench"])
def test_help_explains_options(module):
    r = run(module, "--help")
    assert r.returncode == 0 and "--set" in r.stdout and "--config" in r.stdout


def test_train_dry_run_prints_config_and_schedule():
    r = run("stylegan_dist.train", "--dry-run", "--workers", "8")
    assert r.returncode == 0, r.stderr
    assert "mapping_layers: 8" in r.stdout and "Schedule for 8 worker(s)" in r.stdout
    assert "7800 -    8400   1024  fade-in          4     32   0.003" in r.stdout


@pytest.mark.slow
def test_train_no_ray_writes_checkpoint_grid_and_mlflow(tmp_path):
    data = tmp_path / "shapes16"
    r = run("data_pipeline.synthetic", data, "--num-images", "128", "--resolution", "16", "--seed", "2")
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {resolution: 16, fmap_base: 64, fmap_max: 16, latent_dim: 16, w_dim: 16}\n"
                   "generator: {mapping_fmaps: 16}\n"
                   "schedule: {start_resolution: 8, stabilise_kimg: 0.064, fade_kimg: 0.064, total_kimg: 0.256,\n"
                   "  batch_per_gpu: {}, batch_base: 8, tick_kimg_base: 0.064, tick_kimg_dict: {}}\n"
                   "train: {checkpoint_kimg: 0.1, grid_size: 4}\n")
    storage = tmp_path / "runs"
    r = run("stylegan_dist.train", "--no-ray", "--config", cfg, "--data", data, "--storage", storage, "--max-ticks", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped at kimg 0.128" in r.stdout
    r = run("stylegan_dist.train", "--no-ray", "--config", cfg, "--data", data, "--storage", storage)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stdout and "Training finished" in r.stdout
    run_dir = storage / "c"
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "checkpoints").glob("ckpt-*.pt")) and list((run_dir / "samples").glob("grid-*.png"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("stylegan_dist").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run logged into the same run
    hist = client.get_metric_history(runs[0].info.run_id, "progress/kimg")
    assert sorted(m.step for m in hist) == [64, 128, 192, 256]


def test_metric_files_made_absolute_and_checked_before_launch(tmp_path, monkeypatch):
    """Ray workers run in Ray's copy of the working directory: a relative metrics.classifier must reach them
    absolute, and a missing one is refused before anything is started or written."""
    from stylegan_dist.config import ConfigError, build_config
    from stylegan_dist.train import absolute_metric_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clf.pt").write_bytes(b"x")
    cfg = absolute_metric_files(build_config(set_args=["metrics.names=fid_shapes", "metrics.classifier=clf.pt",
                                                       "metrics.cache_dir=cache"]))
    assert cfg.metrics.classifier == str(tmp_path / "clf.pt") and cfg.metrics.cache_dir == str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="metrics.classifier .*missing.pt does not exist"):
        absolute_metric_files(build_config(set_args=["metrics.names=ls", "metrics.classifier=missing.pt"]))
    # not needed by the configured metrics: not checked
    absolute_metric_files(build_config(set_args=["metrics.names=ppl_wend", "metrics.classifier=missing.pt"]))
    r = run("stylegan_dist.train", "--no-ray", "--data", tmp_path, "--storage", tmp_path / "runs", "--set",
            "metrics.names=fid_shapes", "--set", "metrics.classifier=missing.pt")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "missing.pt" in r.stderr
    assert not (tmp_path / "runs").exists()
