import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every Ray instance the tests start runs with token authentication, as clusters should; one token per test
# session, handed to the clusters, the commands under test and in-process ray.init alike.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

from services import RayCluster  # noqa: E402

from stylegan_dist.config import build_config  # noqa: E402

# Tiny networks from the same code as the full-size model.
TINY = [
    "model.fmap_base=128", "model.fmap_max=32", "model.latent_dim=32", "model.w_dim=32",
    "generator.mapping_fmaps=32",
]


def tiny_config(*extra: str, resolution: int = 32):
    return build_config(set_args=[f"model.resolution={resolution}", *TINY, *extra])


# A few ticks across two resolution changes: 8 (stable) -> 16 (fade, stable) -> 32 (fade, stable).
TINY_SCHEDULE = [
    "schedule.start_resolution=8", "schedule.stabilise_kimg=0.064", "schedule.fade_kimg=0.064",
    "schedule.total_kimg=0.4", "schedule.batch_per_gpu={}", "schedule.batch_base=8",
    "schedule.tick_kimg_dict={}", "schedule.tick_kimg_base=0.032", "train.checkpoint_kimg=0.1",
    "train.grid_size=4",
]


# A run config for the Ray tests: 8 -> 16 in five ticks of 64 images, a checkpoint every tick.
TINY_RUN = """
model: {resolution: 16, fmap_base: 64, fmap_max: 16, latent_dim: 16, w_dim: 16}
generator: {mapping_fmaps: 16}
schedule:
  start_resolution: 8
  stabilise_kimg: 0.064
  fade_kimg: 0.064
  total_kimg: 0.32
  batch_per_gpu: {}
  batch_base: 8
  tick_kimg_base: 0.064
  tick_kimg_dict: {}
train: {checkpoint_kimg: 0.06, grid_size: 4}
"""


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def random_images(n: int = 48, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, resolution, resolution, generator=g) * 255).to(torch.uint8)


# ---- a real Ray cluster for the Ray tests (tests/test_ray_train.py, tests/test_sweep.py) ----


def ray_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster (head node only, 4 logical CPUs, token authentication), every port explicit, started in
    its own session so that exactly its processes are stopped at the end."""
    rc = RayCluster(node_cpus=(4,), env=ray_env()).start()
    try:
        yield {"address": rc.address, "dashboard": rc.dashboard, "env": rc.env, "ray": rc.ray, "cluster": rc}
    finally:
        rc.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes16"
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(out), "--num-images", "256",
                    "--resolution", "16", "--seed", "1"], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def s3():
    """An S3-protocol server (moto) on 127.0.0.1 with a bucket named ``bucket``; this process's AWS settings point
    at it while the module runs (pyarrow and boto3 read them)."""
    from services import S3Server

    server = S3Server().start()
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # storage reads the endpoint per call, so no cached filesystem goes stale
    try:
        server.client().create_bucket(Bucket="bucket")
        yield server
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
