"""The product as a team runs it, every component real and on this machine: a two-node Ray cluster with token
authentication (`ray start --head` + `ray start --address ... --temp-dir <own>`), jobs submitted with
`ray job submit`, runs and data on an S3-protocol object store (moto's server), and an MLflow tracking server with
a PostgreSQL backend store, proxied S3 artifacts and basic authentication. No shared disk is assumed: the job
names only URIs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, ray_env
from services import MlflowServer, Postgres, RayCluster, free_port, wait_for

from stylegan_dist import storage
from stylegan_dist.ray_train import run_checkpoints
from stylegan_dist.tracking import image_steps

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DATA = "s3://bucket/shapes"
# The README's demo config, with its schedule shortened to a few ticks (the networks, widths and resolution are the
# demo's own).
DEMO_SHORT = ["--set", "schedule.stabilise_kimg=0.1", "--set", "schedule.fade_kimg=0.1", "--set",
              "schedule.total_kimg=0.4", "--set", "schedule.tick_kimg_base=0.1", "--set", "schedule.tick_kimg_dict={}",
              "--set", "train.checkpoint_kimg=0.1", "--set", "train.grid_size=8"]


def _demo_resolution() -> int:
    import yaml

    return int(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["resolution"])


@pytest.fixture(scope="module")
def stack(s3, tmp_path_factory):
    """PostgreSQL + MLflow server (artifacts on the S3 server) + a two-node Ray cluster whose nodes know the object
    store's endpoint (as cloud nodes know theirs). The MLflow address and credentials reach the job through
    --runtime-env-json, as README shows."""
    tmp = tmp_path_factory.mktemp("cfg")
    # as README's "On a cluster" does it: the synthetic dataset made and copied into the bucket, the token made by
    # Ray's own command (with a HOME of its own, so the machine's ~/.ray stays untouched)
    dataset = tmp / "shapes"
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(dataset), "--num-images", "256",
                    "--resolution", str(_demo_resolution()), "--seed", "1"], check=True, capture_output=True,
                   timeout=300, cwd=ROOT)
    up = subprocess.run([sys.executable, "-m", "stylegan_dist.storage", "copy", str(dataset), DATA], cwd=ROOT,
                        env=dict(os.environ, **s3.env), capture_output=True, text=True, timeout=300)
    assert up.returncode == 0 and "Copied" in up.stdout, up.stderr[-2000:]
    (tmp / "home").mkdir()
    token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                           env=dict(os.environ, HOME=str(tmp / "home"), RAY_AUTH_MODE="token"), capture_output=True,
                           text=True, timeout=120).stdout.strip()
    assert len(token) >= 32, token
    pg = Postgres().start()
    mlflow = None
    cluster = None
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                          "MLFLOW_TRACKING_PASSWORD")}
    try:
        mlflow = MlflowServer(pg, "s3://bucket/mlflow", s3.env).start()
        os.environ.update(mlflow.client_env)  # for this process's MlflowClient
        cluster = RayCluster(node_cpus=(3, 2), env=ray_env(**s3.env), token=token).start()
        (tmp / "tiny.yaml").write_text(TINY_RUN)
        yield {"s3": s3, "mlflow": mlflow, "cluster": cluster, "config": str(tmp / "tiny.yaml"), "tmp": tmp,
               "runtime_env": {"env_vars": dict(mlflow.client_env, STYLEGAN_DIST_PID_DIR=str(tmp / "pids"))}}
    finally:
        if cluster is not None:
            cluster.close()
        if mlflow is not None:
            mlflow.stop()
        pg.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_cmd(stack, run: str, *extra: str, config: str | None = None) -> list[str]:
    return ["python", "-m", "stylegan_dist.train", "--config", config or stack["config"], "--data", DATA,
            "--storage", "s3://bucket/runs", "--run-name", run, "--workers", "2", "--placement", "SPREAD", *extra]


def _job_output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def _submission_id(text: str) -> str:
    m = re.search(r"raysubmit_\w+", text)
    assert m, text[-2000:]
    return m.group(0)


def _job_status(cluster: RayCluster, sid: str) -> str:
    r = subprocess.run([cluster.ray, "job", "status", "--address", cluster.dashboard, sid], env=cluster.env,
                       capture_output=True, text=True, timeout=120)
    text = r.stdout + r.stderr
    m = re.search(r"Job '[^']+' (succeeded|failed|stopped)", text) or re.search(r"Status for job '[^']+': (\w+)", text)
    return m.group(1).upper() if m else "UNKNOWN"


def _job_logs(cluster: RayCluster, sid: str) -> str:
    r = subprocess.run([cluster.ray, "job", "logs", "--address", cluster.dashboard, sid], env=cluster.env,
                       capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def _steps(client, run_id: str, key: str = "progress/kimg") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_submit_needs_the_token(stack):
    cluster = stack["cluster"]
    home = stack["tmp"] / "nohome"  # no ~/.ray/auth_token there
    home.mkdir(exist_ok=True)
    no_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    r = cluster.submit("python", "-c", "print('ran')", working_dir=stack["tmp"], env=dict(no_token, HOME=str(home)),
                       timeout=120)
    assert r.returncode != 0 and "ran" not in r.stdout and "authentication" in _job_output(r).lower()
    r = cluster.submit("python", "-c", "print('ran')", working_dir=stack["tmp"],
                       env=dict(cluster.env, RAY_AUTH_TOKEN="0" * 64), timeout=120)
    assert r.returncode != 0 and "ran" not in r.stdout
    r = cluster.submit("python", "-c", "print('ran')", working_dir=stack["tmp"], timeout=300)
    assert r.returncode == 0 and "ran" in r.stdout, _job_output(r)[-3000:]


def test_job_on_two_nodes_with_object_storage_and_tracking_server(stack):
    cluster, s3, mlflow = stack["cluster"], stack["s3"], stack["mlflow"]
    r = cluster.submit(*_train_cmd(stack, "s3run", *DEMO_SHORT, config="configs/demo.yaml"), working_dir=ROOT,
                       runtime_env=stack["runtime_env"])
    out = _job_output(r)
    assert r.returncode == 0 and "succeeded" in out.lower(), out[-5000:]
    assert "Training finished" in out
    # the workers ran on both nodes
    nodes = {(stack["tmp"] / "pids" / f"rank{i}.pid").read_text().split()[1] for i in (0, 1)}
    assert len(nodes) == 2
    # the bucket holds the run: Ray's checkpoints, sample grids, the resolved config
    keys = s3.keys("bucket", "runs/s3run/")
    assert any(re.fullmatch(r"runs/s3run/checkpoint_[^/]+/ckpt\.pt", k) for k in keys), keys
    assert any(re.fullmatch(r"runs/s3run/samples/grid-\d{10}\.png", k) for k in keys), keys
    assert "runs/s3run/config.yaml" in keys
    ckpts = run_checkpoints("s3://bucket/runs/s3run")
    assert ckpts and ckpts[-1]["cur_nimg"] >= 400 and len(ckpts) <= 3
    # nothing landed in Ray's temporary copy of the working directory
    leaked = [p for p in cluster.root.rglob("_ray_pkg_*/*") if p.name in ("runs", "mlruns", "mlflow.db")]
    assert not leaked, leaked
    # the MLflow run, through the server: metrics and artifacts (served by the server from the bucket)
    client = mlflow.client()
    run = client.get_run(ckpts[-1]["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["storage"] == "s3://bucket/runs"
    assert max(_steps(client, run.info.run_id)) == ckpts[-1]["cur_nimg"]
    assert run.data.params["model.resolution"] == str(_demo_resolution())
    assert client.get_metric_history(run.info.run_id, "loss/G")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    steps = _steps(client, run.info.run_id)
    assert image_steps(client, run.info.run_id, "samples") == steps  # the grids, as time-stepped images
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images")
             if a.path.startswith("images/samples+step+") and a.path.endswith(".png")]
    local = client.download_artifacts(run.info.run_id, grids[-1], str(stack["tmp"]))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(k.endswith(grids[-1]) for k in s3.keys("bucket", "mlflow/"))
    # system metrics from local rank 0 of each of the two nodes, at the training's steps
    for node in ("node_0", "node_1"):
        cpu = client.get_metric_history(run.info.run_id, f"system/{node}/cpu_utilization_percentage")
        assert sorted(m.step for m in cpu) == steps, node
    # G_ema registered through the server (artifacts in the bucket) and loadable from it by name
    version = client.get_model_version("s3run", "1")
    assert version.run_id == run.info.run_id and run.data.tags["model.uri"] == "models:/s3run/1"
    import numpy as np
    from mlflow import pyfunc  # (the fixture's server is the local name "mlflow")

    from stylegan_dist.mlflow_model import _tracking

    with _tracking(mlflow.url):
        model = pyfunc.load_model("models:/s3run/1")
    res = int(version.tags["resolution"])  # where the shortened schedule ended
    z = np.random.RandomState(0).randn(2, model.metadata.get_input_schema().inputs[0].shape[1]).astype(np.float32)
    assert model.predict(z).shape[1:] == (3, res, res)


def test_node_failure_resumes_on_the_remaining_node(stack):
    cluster, mlflow = stack["cluster"], stack["mlflow"]
    uri = "s3://bucket/runs/failover"
    r = cluster.submit(*_train_cmd(stack, "failover", "--set", "schedule.total_kimg=1.28"), working_dir=ROOT,
                       runtime_env=stack["runtime_env"], no_wait=True)
    assert r.returncode == 0, _job_output(r)[-3000:]
    sid = _submission_id(_job_output(r))
    first = wait_for(lambda: run_checkpoints(uri), 420, "the first registered checkpoint", interval=0.5)
    cluster.kill_node(1)  # the second node's raylet and its workers, SIGKILL
    killed_at = max(c["cur_nimg"] for c in run_checkpoints(uri))
    assert killed_at < 1280, "the run ended before the node was killed"
    status = wait_for(lambda: (s := _job_status(cluster, sid)) in ("SUCCEEDED", "FAILED", "STOPPED") and s, 900,
                      "the job to end", interval=2)
    logs = _job_logs(cluster, sid)
    assert status == "SUCCEEDED", logs[-5000:]
    resumed = [float(x) for x in re.findall(r"Resumed from checkpoint at kimg ([0-9]+\.[0-9]+)", logs)]
    assert resumed and resumed[-1] * 1000 >= first[0]["cur_nimg"], logs[-3000:]
    ckpts = run_checkpoints(uri)
    assert ckpts[-1]["cur_nimg"] == 1280
    run_ids = {c["mlflow_run_id"] for c in ckpts + first}
    assert len(run_ids) == 1
    steps = _steps(mlflow.client(), run_ids.pop())
    expected = list(range(64, 1281, 64))
    assert sorted(set(steps)) == expected  # no tick missing
    # ticks after the resumed checkpoint may have been logged twice (before the failure and after it), no others
    dup = {s for s in steps if steps.count(s) > 1}
    assert all(s > resumed[-1] * 1000 for s in dup), (dup, resumed)


def test_resubmit_after_cluster_restart_continues_from_the_bucket(stack):
    cluster, mlflow = stack["cluster"], stack["mlflow"]
    cmd = _train_cmd(stack, "again", "--max-ticks", "2")
    r1 = cluster.submit(*cmd, working_dir=ROOT, runtime_env=stack["runtime_env"])
    assert r1.returncode == 0 and "stopped at kimg 0.128" in r1.stdout, _job_output(r1)[-4000:]
    run_id = run_checkpoints("s3://bucket/runs/again")[-1]["mlflow_run_id"]
    cluster.stop()
    cluster.start()
    r2 = cluster.submit(*cmd, working_dir=ROOT, runtime_env=stack["runtime_env"])
    out = _job_output(r2)
    assert r2.returncode == 0, out[-4000:]
    assert "from kimg 0.128" in out and "Resumed from checkpoint at kimg 0.128" in out
    ckpts = run_checkpoints("s3://bucket/runs/again")
    assert ckpts[-1]["cur_nimg"] == 256 and {c["mlflow_run_id"] for c in ckpts} == {run_id}
    assert _steps(mlflow.client(), run_id) == [64, 128, 192, 256]


def _local_train(stack, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**stack["cluster"].env, **stack["mlflow"].client_env, **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "stylegan_dist.train", "--config", stack["config"], *args],
                          env=env, cwd=stack["tmp"], capture_output=True, text=True, timeout=300)


def _assert_one_sentence(r: subprocess.CompletedProcess, text: str) -> None:
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and err and err[-1].startswith("error: ") and text in err[-1], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_bad_input_one_sentence_and_nothing_written(stack):
    s3 = stack["s3"]
    storage.write_text("s3://bucket/notdata/readme.txt", "not a dataset")
    before = sorted(s3.keys("bucket"))
    cases = [
        (["--data", DATA, "--storage", "s3://bucket/runs"], {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
         "Cannot reach the object store"),
        (["--data", DATA, "--storage", "s3://nobucket/runs"], {}, "bucket 'nobucket'"),
        (["--data", "s3://bucket/notdata", "--storage", "s3://bucket/runs"], {}, "no manifest.json"),
        (["--data", "s3://bucket/nothing/here", "--storage", "s3://bucket/runs"], {}, "does not exist"),
        (["--data", DATA, "--storage", "s3://bucket/runs"], {"MLFLOW_TRACKING_PASSWORD": "wrong"},
         "refused the credentials"),
    ]
    for args, env, text in cases:
        _assert_one_sentence(_local_train(stack, *args, env_extra=env), text)
    assert sorted(s3.keys("bucket")) == before
    assert not (stack["tmp"] / "runs").exists()
    # a relative --storage inside a job is refused before any work
    cluster = stack["cluster"]
    r = cluster.submit("python", "-m", "stylegan_dist.train", "--config", stack["config"], "--data", DATA,
                       "--storage", "runs", working_dir=ROOT, runtime_env=stack["runtime_env"])
    out = _job_output(r)
    assert r.returncode != 0 and "relative path inside a Ray job" in out and "Traceback" not in out, out[-3000:]
    assert sorted(s3.keys("bucket")) == before
    assert not [p for p in cluster.root.rglob("_ray_pkg_*/runs")]


def test_train_connects_to_the_running_cluster(stack, tmp_path):
    """Without RAY_ADDRESS, `train` finds the cluster `ray start` made (address auto) instead of starting its own."""
    cluster = stack["cluster"]
    env = dict(cluster.env, **stack["mlflow"].client_env)
    env.pop("RAY_ADDRESS", None)
    code = ("from stylegan_dist.ray_train import init_ray\nray = init_ray()\n"
            "print('NODES', len([n for n in ray.nodes() if n['Alive']]))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert "Connected to the running Ray cluster" in r.stdout, r.stdout + r.stderr[-3000:]
    assert f"NODES {cluster.alive_nodes()}" in r.stdout
