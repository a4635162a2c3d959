"""The MLflow UI screenshot command against a real `mlflow ui` and Debian's headless Chromium: a tracked run logged
the way training logs it (grouped metrics, sample grids as time-stepped images, system metrics, the generator
registered) and a sweep with two trials. The README's test command installs Chromium (about 30 s from the Debian
archive); without it this test fails, naming the package."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, tiny_config

pytestmark = [pytest.mark.slow]


def _tracked_run(uri: str, experiment: str, tmp):
    from stylegan_dist.images import save_png
    from stylegan_dist.networks import build_generator
    from stylegan_dist.run_tracking import RunTracker
    from stylegan_dist.tracking import create_run

    cfg = tiny_config("schedule.start_resolution=8", "schedule.stabilise_kimg=0.1", "schedule.fade_kimg=0.1",
                      "tracking.system_metrics_sec=0.2", resolution=16)
    run_id = create_run(uri, experiment, "ui-run", {"model.resolution": "16"})
    tracker = RunTracker(uri, run_id, cfg, "ui-generator", log=None)
    rng = np.random.RandomState(0)
    for tick, nimg in enumerate((100, 200, 300), 1):
        grid = save_png((rng.rand(64, 64, 3) * 255).astype(np.uint8), str(tmp / f"grid-{nimg}.png"))
        tracker.tick({"tick": tick, "kimg": nimg / 1000, "cur_nimg": nimg, "resolution": 16, "lod": 0.0,
                      "loss/G": 1.0 / tick, "loss/D": 0.5 + tick, "img_per_sec": 10.0 * tick, "grid": grid})
    tracker.generator(build_generator(cfg), {"cur_nimg": 300}, True)
    tracker.close()
    tracker.logger.terminate("FINISHED")
    return run_id


def _sweep(uri: str):
    from stylegan_dist.tracking import RunLogger, create_run

    parent = create_run(uri, "ui-sweep", "ui-sweep", {}, tags={"sweep.role": "parent"})
    for i, (mix, fid, ppl) in enumerate([(0.0, 30.0, 200.0), (0.9, 25.0, 150.0)]):
        run = create_run(uri, "ui-sweep", f"mixing_prob={mix}", {"generator.mixing_prob": str(mix)},
                         tags={"mlflow.parentRunId": parent, "sweep.role": "trial", "sweep.index": str(i)})
        RunLogger(uri, run).log_metrics({"fid50k": fid, "ppl_wend": ppl, "kimg": 0.3}, step=300)
        RunLogger(uri, run).terminate("FINISHED")


def test_screenshots_of_a_run_and_a_sweep_in_the_mlflow_ui(tmp_path):
    assert shutil.which("chromium"), "Chromium is not installed (Debian: apt-get install chromium)"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _tracked_run(uri, "ui-exp", tmp_path)
    _sweep(uri)
    out = tmp_path / "shots"
    r = subprocess.run([sys.executable, "-m", "stylegan_dist.screenshots", "--tracking-uri", uri, "--experiment",
                        "ui-exp", "--run", "ui-run", "--sweep-experiment", "ui-sweep", "--out", str(out),
                        "--width", "1280", "--height", "900", "--settle", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ["runs", "charts", "system", "model", "sweep-compare", "images-last", "images-first"]
    for name in names:
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    text = {n: (out / f"{n}.txt").read_text() for n in names}
    assert all("ui-run" in text[n] for n in ("runs", "charts", "system"))  # the run's name, rendered
    assert "loss" in text["charts"] and "progress" in text["charts"]  # grouped chart sections
    assert "system/node_0" in text["system"] and "cpu_utilization_percentage" in text["system"]
    assert "ui-generator" in text["model"] and "Version 1" in text["model"]
    assert "mixing_prob=0.9" in text["sweep-compare"] and "metrics/fid50k" in text["sweep-compare"]
    assert "300" in text["images-last"] and "100" in text["images-first"]  # the slider's step box


def test_screenshots_refuses_a_missing_store(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stylegan_dist.screenshots", "--tracking-uri",
                        f"sqlite:///{tmp_path / 'none.db'}", "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: The tracking store sqlite:///{tmp_path / 'none.db'} does not exist."]
    assert not (tmp_path / "o").exists()
