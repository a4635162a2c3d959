"""Sweeps end to end, started the way users start them: a real Ray cluster from `ray start --head`, the smoke
sweep through `ray job submit` (with evaluation on random-weight feature extractors), an interrupted sweep
continued by running the same command again, the comparison command, and a real MLflow server queried
through its REST API."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, ray_env
from services import free_port

from stylegan_dist.ray_train import run_checkpoints
from stylegan_dist.tracking import image_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _client(storage: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{storage.resolve() / 'mlflow.db'}")


def _sweep_runs(storage: Path, name: str):
    client = _client(storage)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    return client, parents, children


@pytest.fixture(scope="module")
def smoke(cluster, dataset, tmp_path_factory):
    """The smoke sweep submitted as a Ray job, evaluating FID and PPL with random-weight extractors."""
    from stylegan_dist.metrics.testing import write_random_weight_files

    root = tmp_path_factory.mktemp("smoke")
    weights = {k: str(v) for k, v in write_random_weight_files(root / "weights").items()}
    storage = root / "runs"
    cmd = ["python", "-m", "stylegan_dist.sweep", "sweeps/smoke.yaml", "--data", str(dataset), "--storage",
           str(storage), "--set", "evaluate.metrics=[fid50k, ppl_wend]", "--set", "evaluate.num=16",
           "--set", "evaluate.batch=16", "--set", f"evaluate.weights={json.dumps(weights)}",
           "--set", f"evaluate.cache_dir={root / 'cache'}", "--set", "objective.metric=fid50k",
           # PPL also during training, every tick: its final value is reused, not computed again
           "--set", "metrics.names=ppl_wend", "--set", "metrics.kimg=0.064", "--set", "metrics.num=16",
           "--set", "metrics.batch_size=16"]
    for _ in range(12):  # the job agent registers with the head some seconds after `ray start`
        job = subprocess.run([cluster["ray"], "job", "submit", "--address", cluster["dashboard"], "--working-dir",
                              str(ROOT), "--", *cmd], env=cluster["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stderr:
            break
        time.sleep(5)
    return {"job": job, "storage": storage, "out": job.stdout + job.stderr, "root": root}


def test_smoke_sweep_job(smoke):
    job, storage = smoke["job"], smoke["storage"]
    assert job.returncode == 0, smoke["out"][-5000:]
    assert "succeeded" in smoke["out"].lower()
    assert "Sweep smoke: 2 finished, 0 stopped early, 0 failed, 0 unfinished" in smoke["out"]
    client, parents, children = _sweep_runs(storage, "smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    assert {r.data.params["generator.mixing_prob"] for r in children} == {"0.0", "0.9"}
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["sweep.status"] == "finished"
        assert r.data.params["model.resolution"] == "16" and r.data.params["workers"] == "1"
        kimg = client.get_metric_history(r.info.run_id, "progress/kimg")
        assert len(kimg) == 3 and max(m.value for m in kimg) == pytest.approx(0.192)
        assert {m.value for m in client.get_metric_history(r.info.run_id, "progress/resolution")} == {8.0, 16.0}
        assert client.get_metric_history(r.info.run_id, "loss/G")
        fid = client.get_metric_history(r.info.run_id, "metrics/fid50k")  # evaluated once, at the end
        assert [m.step for m in fid] == [192] and math.isfinite(fid[0].value) and fid[0].value > 0
        ppl = client.get_metric_history(r.info.run_id, "metrics/ppl_wend")  # every tick during training
        assert sorted(m.step for m in ppl) == [64, 128, 192] and all(math.isfinite(m.value) for m in ppl)
        assert [m.step for m in client.get_metric_history(r.info.run_id, "time/eval_seconds")] == [192]
        assert image_steps(client, r.info.run_id, "samples") == [64, 128, 192]
        # the trial's Ray Train run lives under the sweep, with its MLflow run id and result next to it
        tdir = Path(r.data.tags["run_dir"])
        assert tdir.parent == storage / "smoke" / "trials"
        assert (tdir / "mlflow_run_id").read_text().strip() == r.info.run_id
        result = json.loads((tdir / "result.json").read_text())
        assert result["metrics"]["fid50k"] == pytest.approx(r.data.metrics["metrics/fid50k"])
        assert result["kimg"] == 0.192
        assert result["metrics"]["ppl_wend"] == pytest.approx(max(ppl, key=lambda m: m.step).value)
        assert r.data.params["metrics.vgg16_weights"].endswith("vgg16-random.pth")
    logged = {a.path for a in client.list_artifacts(parent, "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.csv", "comparison/metrics_vs_paper.png"} <= logged
    assert [a.path for a in client.list_artifacts(parent, "sweep")] == ["sweep/smoke.yaml"]
    assert (storage / "smoke" / "report" / "comparison.md").is_file()


def test_compare_prints_two_rows(smoke, tmp_path):
    assert smoke["job"].returncode == 0
    r = subprocess.run([sys.executable, "-m", "stylegan_dist.compare", "--experiment", "smoke", "--storage",
                        str(smoke["storage"]), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=ray_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| mixing_prob=")]
    assert len(rows) == 2, r.stdout
    assert "E 0%" in rows[0] and "4.42" in rows[0] and "F 90%" in rows[1] and "4.40" in rows[1]
    assert sum(line.count(" * ") + line.endswith(" *") for line in rows) <= 1
    with open(tmp_path / "out" / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    client, _, children = _sweep_runs(smoke["storage"], "smoke")
    fids = {r.data.params["generator.mixing_prob"]: r.data.metrics["metrics/fid50k"] for r in children}
    assert {row["generator.mixing_prob"]: float(row["fid50k"]) for row in table} == pytest.approx(fids)
    assert all(float(row["kimg"]) == 0.192 and row["status"] == "finished" for row in table)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "fid_over_kimg.png", "loss_D_over_kimg.png", "loss_G_over_kimg.png", "metrics_vs_paper.png"]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_mlflow_server_rest_api(smoke, tmp_path):
    """A real `mlflow server` over the sweep's store: what a user sees in the UI is there."""
    assert smoke["job"].returncode == 0
    storage = smoke["storage"].resolve()
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{storage / 'mlflow.db'}",
                               "--default-artifact-root", str(storage / "mlartifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        exp = _rest(base, "experiments/get-by-name?experiment_name=smoke")["experiment"]
        # shown in MLflow 3's model-training view, not the GenAI one
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        runs = _rest(base, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parent = [r for r, t in zip(runs, tags) if t.get("sweep.role") == "parent"]
        children = [(r, t) for r, t in zip(runs, tags) if t.get("sweep.role") == "trial"]
        assert len(parent) == 1 and len(children) == 2
        pid = parent[0]["info"]["run_id"]
        for run, t in children:
            rid = run["info"]["run_id"]
            assert t["mlflow.parentRunId"] == pid and run["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert params["model.resolution"] == "16" and params["generator.mixing_prob"] in ("0.0", "0.9")
            # the row of the paper's Table 2 the trial reproduces
            assert (t["sweep.paper_row"], t["paper.row"]) in (("0", "E 0%"), ("0.9", "F 90%"))
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert metrics["progress/kimg"] == pytest.approx(0.192) and "metrics/fid50k" in metrics
            assert {"loss/G", "loss/D", "loss/R1", "speed/img_per_sec", "metrics/ppl_wend"} <= set(metrics)
            # every key in a group: the UI draws one chart section per prefix
            assert {k.split("/")[0] for k in metrics} <= {"loss", "scores", "skipped_steps", "progress", "speed",
                                                         "memory", "metrics", "time", "system"}, sorted(metrics)
            for key in ("progress/kimg", "system/node_0/cpu_utilization_percentage",
                        "system/node_0/system_memory_usage_megabytes"):
                q = urllib.parse.urlencode({"run_id": rid, "metric_key": key})
                hist = _rest(base, f"metrics/get-history?{q}")["metrics"]
                assert sorted(int(m["step"]) for m in hist) == [64, 128, 192], key  # one step axis: images seen
            # sample grids as time-stepped images
            q = urllib.parse.urlencode({"run_id": rid, "path": "images"})
            files = [f["path"] for f in _rest(base, f"artifacts/list?{q}").get("files", [])]
            steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in files
                           if p.startswith("images/samples+step+") and p.endswith(".png"))
            assert steps == [64, 128, 192], files
            assert t["mlflow.loggedImages"].lower() == "true"
        # each trial's G_ema is a version of the registered model named after the sweep
        versions = _rest(base, "model-versions/search?" + urllib.parse.urlencode({"filter": "name='smoke'"}))
        versions = versions["model_versions"]
        assert sorted(v["run_id"] for v in versions) == sorted(r["info"]["run_id"] for r, _ in children)
        import mlflow.pyfunc
        import numpy as np

        from stylegan_dist.mlflow_model import _tracking

        with _tracking(base):
            model = mlflow.pyfunc.load_model(f"models:/smoke/{versions[0]['version']}")
        z = np.random.RandomState(0).randn(3, 16).astype(np.float32)
        images = model.predict(z)
        assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all() and np.abs(images).max() > 0
        q = urllib.parse.urlencode({"run_id": pid, "path": "comparison"})
        names = {f["path"] for f in _rest(base, f"artifacts/list?{q}")["files"]}
        assert "comparison/comparison.md" in names and "comparison/metrics_vs_paper.png" in names
        # and an artifact's bytes come through the server
        q = urllib.parse.urlencode({"run_id": pid, "path": "comparison/comparison.csv"})
        with urllib.request.urlopen(f"{base}/get-artifact?{q}", timeout=30) as resp:
            assert resp.read().decode().startswith("trial,run_id,status")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def _sweep_cmd(dataset: Path, storage: Path) -> list[str]:
    # 0.64 kimg: several short ticks at 16x16 after the first checkpoint, time enough to interrupt the second trial
    return [sys.executable, "-m", "stylegan_dist.sweep", "sweeps/smoke.yaml", "--data", str(dataset),
            "--storage", str(storage), "--set", "schedule.total_kimg=0.64", "--no-report"]


def test_interrupted_sweep_continues(cluster, dataset, tmp_path):
    storage = tmp_path / "runs"
    trials = storage / "smoke" / "trials"
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"])
    out1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_sweep_cmd(dataset, storage), env=env, cwd=ROOT, stdout=out1, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    done = pending = None
    # wait until the first trial has finished and the second has a registered checkpoint, then press Ctrl-C
    while time.time() < deadline and proc.poll() is None:
        dirs = sorted(trials.glob("*")) if trials.exists() else []
        done = [d for d in dirs if (d / "result.json").is_file()]
        pending = [d for d in dirs if not (d / "result.json").is_file() and run_checkpoints(str(d))]
        if done and pending:
            break
        time.sleep(0.2)
    assert done and pending, (tmp_path / "first.log").read_text()[-4000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-4000:]
    out1.close()
    first_log = (tmp_path / "first.log").read_text()
    assert "Interrupted: run the same command to continue" in first_log
    finished, unfinished = done[0], pending[0]
    assert not (unfinished / "result.json").exists()
    finished_result = (finished / "result.json").read_text()
    finished_mtime = (finished / "result.json").stat().st_mtime_ns
    finished_ckpts = sorted(p.name for p in finished.glob("checkpoint_*"))
    client, parents, children = _sweep_runs(storage, "smoke")
    by_dir = {Path(r.data.tags["run_dir"]).name: r for r in children}
    assert by_dir[unfinished.name].info.status == "KILLED"
    assert by_dir[unfinished.name].data.tags["sweep.status"] == "interrupted"
    finished_points = len(client.get_metric_history(by_dir[finished.name].info.run_id, "progress/kimg"))

    second = subprocess.run(_sweep_cmd(dataset, storage), env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=400)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert any("finished at kimg 0.64 (kept)" in line and line.endswith(finished.name) for line in log.splitlines())
    assert "continues from kimg" in log and "Continuing the Tune experiment" in log
    assert "Resumed from checkpoint at kimg" in log
    assert "Sweep smoke: 2 finished" in log
    # the finished trial was not redone: same result, no new checkpoint, no new metrics
    assert (finished / "result.json").read_text() == finished_result
    assert (finished / "result.json").stat().st_mtime_ns == finished_mtime
    assert sorted(p.name for p in finished.glob("checkpoint_*")) == finished_ckpts
    client, parents2, children2 = _sweep_runs(storage, "smoke")
    assert [p.info.run_id for p in parents2] == [p.info.run_id for p in parents]  # the same parent run, reused
    assert parents2[0].info.status == "FINISHED"
    assert sorted(r.info.run_id for r in children2) == sorted(r.info.run_id for r in children)  # no new trial runs
    assert len(client.get_metric_history(by_dir[finished.name].info.run_id, "progress/kimg")) == finished_points
    # the unfinished trial continued in its own MLflow run from its checkpoint, not from zero
    resumed = client.get_run(by_dir[unfinished.name].info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["sweep.status"] == "finished"
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "progress/kimg")]
    assert steps.count(64) == 1 and max(steps) == 640
    assert json.loads((unfinished / "result.json").read_text())["cur_nimg"] == 640
