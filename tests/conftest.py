import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def random_images(n: int = 48, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, resolution, resolution, generator=g) * 255).to(torch.uint8)


# ---- a real Ray cluster for the Ray tests (tests/test_ray_train.py, tests/test_sweep.py) ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (everything `ray start` launched in its own session, and their children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _stop_session(sid: int) -> None:
    """Stop this test's Ray cluster only: `ray stop` would stop every Ray instance on the machine."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster (head node only, 4 logical CPUs), every port explicit, started in its own
    session so that exactly its processes are stopped at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port, dash = free_port(), free_port()
    env = ray_env(RAY_TMPDIR=str(tmp))
    ray_bin = str(Path(sys.executable).parent / "ray")
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
    start = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=true",
                              f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
                              "--disable-usage-stats", *ports], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sid = start.pid  # a new session's id is its leader's pid; the cluster's daemons keep it after `ray start` exits
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "ray": ray_bin}
    finally:
        _stop_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes16"
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(out), "--num-images", "256",
                    "--resolution", "16", "--seed", "1"], check=True, capture_output=True, timeout=120)
    return out
