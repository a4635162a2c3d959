"""The evaluate command end to end (subprocess, random weight files in the real formats, a temporary MLflow
store), its one-sentence errors, MLflow logging of figures, and the training-time hook."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

from stylegan_dist import figures
from stylegan_dist.metrics import metrics_due, run_training_metrics, with_metrics
from stylegan_dist.metrics.classifier import save_classifier, train_classifier
from stylegan_dist.metrics.testing import make_synthetic_dataset, write_checkpoint, write_random_weight_files
from stylegan_dist.networks import build_generator
from stylegan_dist.tracking import image_steps

CUR_NIMG = 10**8  # far past the schedule's growth: the final resolution


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data = make_synthetic_dataset(d / "shapes32", num_images=128, resolution=32)
    torch.manual_seed(0)
    G = build_generator(tiny_config(resolution=32)).eval()
    ckpt = write_checkpoint(tiny_config(resolution=32), d / "ckpt-0100000000.pt", CUR_NIMG, G)
    weights = write_random_weight_files(d / "weights")
    return {"dir": d, "data": data, "ckpt": ckpt, "weights": weights}


def new_run(uri: str, artifacts: Path) -> str:
    """A run whose artifacts live under ``artifacts`` (the default would be ./mlruns in the working directory)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("test", artifact_location=artifacts.as_uri())
    return client.create_run(exp).info.run_id


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_evaluate_logs_every_metric_to_the_mlflow_run(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    clf = train_classifier(setup["data"], epochs=1, batch_size=64, log=None)
    clf_path = save_classifier(clf, tmp_path / "clf.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri, tmp_path / "artifacts")
    w = setup["weights"]
    out = tmp_path / "res.json"
    r = run_cli("stylegan_dist.evaluate", "--checkpoint", str(setup["ckpt"]), "--data", setup["data"],
                "--metrics", "fid50k,ppl_zfull,ppl_wfull,ppl_zend,ppl_wend,ls", "--num", "8", "--batch", "8",
                "--device", "cpu", "--inception", str(w["inception"]), "--vgg16", str(w["vgg16"]),
                "--lpips", str(w["lpips"]), "--classifier", str(clf_path), "--ls-min-accuracy", "0",
                "--cache-dir", str(tmp_path / "cache"), "--mlflow-run", run_id, "--out", str(out), "--no-ray",
                env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr
    assert "Summary" in r.stdout and "Logged" in r.stdout
    keys = ["fid50k", "ppl_zfull", "ppl_wfull", "ppl_zend", "ppl_wend", "ls_z", "ls_w"]
    grouped = MlflowClient(uri).get_run(run_id).data.metrics
    assert "time/fid50k" in grouped and all(k.startswith(("metrics/", "time/")) for k in grouped)
    logged = {k[len("metrics/"):]: v for k, v in grouped.items() if k.startswith("metrics/")}
    assert set(keys) <= set(logged)
    params = MlflowClient(uri).get_run(run_id).data.params  # the protocol each metric used
    assert params["protocol.fid50k.mirror"] == "True"  # the checkpoint's run mirrored (train.mirror default)
    assert params["protocol.fid50k.reals"].startswith("8 ") and params["protocol.ppl_wend.crop"] == "True"
    assert params["protocol.ls.precision"] == "fp32 (TF32 off)"
    hist = MlflowClient(uri).get_metric_history(run_id, "metrics/ppl_wend")
    assert [m.step for m in hist] == [CUR_NIMG]
    res = json.loads(out.read_text())
    values = {k: v for m in res["results"] for k, v in m["results"].items()}
    assert values == pytest.approx({k: logged[k] for k in keys})
    assert res["resolution"] == 32 and all(m["seconds"] >= 0 for m in res["results"])
    assert values["fid50k"] > 0 and all(values[k] > 0 for k in keys[1:5]) and values["ls_z"] >= 1.0
    assert list((tmp_path / "cache").glob("fid-reals-*.npz"))

    # Figures go to the same run as time-stepped images at the checkpoint's step, beside the sample grids.
    rc = figures.main(["truncation", "--checkpoint", str(setup["ckpt"]), "--out", str(tmp_path / "t.png"),
                       "--device", "cpu", "--cell", "32", "--mlflow-run", run_id, "--tracking-uri", uri])
    assert rc == 0
    assert image_steps(MlflowClient(uri), run_id, "figures/truncation") == [CUR_NIMG]


@pytest.mark.slow
def test_evaluate_errors_are_one_sentence_and_fail_fast(setup, tmp_path):
    base = ["--checkpoint", str(setup["ckpt"]), "--data", setup["data"], "--device", "cpu", "--no-mlflow"]
    r = run_cli("stylegan_dist.evaluate", *base, "--metrics", "fid50k",
                env={"STYLEGAN_INCEPTION_WEIGHTS": str(tmp_path / "missing.pth")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "pt_inception-2015-12-05-6726825d.pth" in lines[0] and str(tmp_path / "missing.pth") in lines[0]

    r = run_cli("stylegan_dist.evaluate", *base, "--metrics", "fid50k,nope")
    assert r.returncode == 2 and "Unknown metric 'nope'" in r.stderr and "ppl_wend" in r.stderr

    w = setup["weights"]
    r = run_cli("stylegan_dist.evaluate", *base[:-1], "--metrics", "ppl_wend", "--vgg16", str(w["vgg16"]),
                "--lpips", str(w["lpips"]), "--mlflow-run", "0123abc",
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"})
    assert r.returncode == 2 and "MLflow run 0123abc was not found" in r.stderr

    r = run_cli("stylegan_dist.evaluate", "--list")
    assert r.returncode == 0 and r.stdout.split() == ["fid50k", "fid50k_mix2", "fid50k_mix3", "fid50k_mix4",
                                                      "fid_shapes", "ls", "ppl_wend", "ppl_wfull", "ppl_zend",
                                                      "ppl_zfull"]
    r = run_cli("stylegan_dist.evaluate", "--help")
    assert r.returncode == 0 and "--mlflow-run" in r.stdout and "--num" in r.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_on_two_ray_cpu_workers_equals_one_process(setup, cluster, tmp_path):
    w = setup["weights"]
    base = ["--checkpoint", str(setup["ckpt"]), "--data", setup["data"], "--metrics", "fid50k,ppl_wend",
            "--num", "12", "--batch", "4", "--inception", str(w["inception"]), "--vgg16", str(w["vgg16"]),
            "--lpips", str(w["lpips"]), "--no-mlflow", "--seed", "3"]
    # one torch thread like each worker (--cpus-per-worker 1): PPL's distance / eps^2 magnifies the last bits that
    # a different thread count's reduction order changes
    one = run_cli("stylegan_dist.evaluate", *base, "--no-ray", "--device", "cpu", "--out", str(tmp_path / "1.json"),
                  "--cache-dir", str(tmp_path / "c1"), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = run_cli("stylegan_dist.evaluate", *base, "--workers", "2", "--cpu", "--out", str(tmp_path / "2.json"),
                  "--cache-dir", str(tmp_path / "c2"), env={**cluster["env"], "RAY_ADDRESS": cluster["address"]})
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 Ray CPU worker(s)" in two.stdout

    def values(path):
        return {k: v for m in json.loads(path.read_text())["results"] for k, v in m["results"].items()}

    v1, v2 = values(tmp_path / "1.json"), values(tmp_path / "2.json")
    assert set(v1) == {"fid50k", "ppl_wend"} and v1["fid50k"] > 0 and v1["ppl_wend"] > 0
    assert v2 == pytest.approx(v1, rel=1e-9)  # chunks of 4: rank 0 computed chunks 0 and 2, rank 1 chunk 1
    bad = run_cli("stylegan_dist.evaluate", *base, "--workers", "9", "--cpu",
                  env={**cluster["env"], "RAY_ADDRESS": cluster["address"]})
    assert bad.returncode == 2 and "do not fit the Ray cluster's 4 CPUs" in bad.stderr


def test_training_hook_runs_configured_metrics(setup):
    cfg = tiny_config(resolution=32)
    G = build_generator(cfg).eval()
    w = setup["weights"]
    assert run_training_metrics(cfg, G, setup["data"], CUR_NIMG, log=None) == {}  # nothing configured
    mcfg = with_metrics(cfg, names="ppl_wend,ppl_zend", kimg=50, num=8, batch_size=8,
                       vgg16_weights=str(w["vgg16"]), lpips_weights=str(w["lpips"]))
    assert not metrics_due(cfg, 10**6, 0, done=False)
    assert metrics_due(mcfg, 50_000, 0, done=False) and not metrics_due(mcfg, 49_999, 0, done=False)
    assert metrics_due(mcfg, 10, 0, done=True)
    lines = []
    out = run_training_metrics(mcfg, G, setup["data"], CUR_NIMG, log=lines.append)
    assert set(out) == {"ppl_wend", "ppl_zend"} and all(v > 0 for v in out.values())
    assert len(lines) == 2 and "ppl_wend" in lines[0]
    # Early in training the schedule's resolution is used (8x8 at the start).
    early = run_training_metrics(mcfg, G, setup["data"], 0, log=lines.append)
    assert set(early) == {"ppl_wend", "ppl_zend"} and "res 8" in lines[-1]


def test_cli_modules_have_help():
    for module in ("stylegan_dist.generate", "stylegan_dist.figures", "stylegan_dist.metrics.classifier"):
        r = run_cli(module, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (module, r.stderr)
    assert Path(ROOT / "docs" / "metrics.md").is_file()
