"""Ray Data streaming inside Ray Train: 2 workers get disjoint splits and see every image once per epoch."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.stream import iter_images

REPO = Path(__file__).resolve().parents[1]
N = 256
BATCH = 16


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    ray = pytest.importorskip("ray")
    tmp = Path("/tmp") / f"rt_dp{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    old = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_TMPDIR")}
    os.environ["RAY_AUTH_MODE"] = "token"  # the session's RAY_AUTH_TOKEN (conftest)
    os.environ["RAY_TMPDIR"] = str(tmp)
    from data_pipeline.stream import default_ray_init_kwargs

    kwargs = default_ray_init_kwargs()
    kwargs["runtime_env"]["env_vars"]["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    ray.init(_temp_dir=str(tmp), **kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        gc.collect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(t.name.startswith("iter_threaded") for t in threading.enumerate()):
            time.sleep(0.05)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_loop(config):
    import numpy as np
    import ray.train

    from data_pipeline.stream import RayBatchSource

    rank = ray.train.get_context().get_world_rank()
    src = RayBatchSource(config["root"], seed=0)
    out = {}
    bs, per = config["batch"], config["per_worker"]
    it = src.batches(8, bs, with_ids=True)
    got = [next(it) for _ in range(per // bs // 2)]
    it = src.batches(8, 2 * bs, with_ids=True)  # the batch size grows mid-epoch: the epoch goes on
    got += [next(it) for _ in range(per // bs // 4)]
    assert src.epoch == 0
    got1 = [next(it) for _ in range(per // bs // 2)]
    assert src.epoch == 1
    for epoch, batches in enumerate((got, got1)):
        ids, imgs = zip(*batches)
        out[f"ids{epoch}"] = np.concatenate(ids)
        out[f"img{epoch}"] = np.concatenate([b.numpy() for b in imgs])
        assert imgs[-1].shape == (2 * bs, 3, 8, 8) and imgs[-1].is_contiguous()
    it = src.batches(16, bs, with_ids=True)  # resolution switch: that dataset's split, a new epoch
    ids, imgs = zip(*[next(it) for _ in range(per // bs)])
    out["ids2"] = np.concatenate(ids)
    out["img2"] = np.concatenate([b.numpy() for b in imgs])
    assert src.epoch == 2
    src.close()
    np.savez(Path(config["dir"]) / f"rank{rank}.npz", **out)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_two_workers_disjoint_and_complete(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data_pipeline.stream import make_ray_datasets

    root = tmp_path / "ds"
    synthetic.run([str(root), "-n", str(N), "-r", "16", "--shard-size", "32", "--rows-per-group", "8", "-q"])
    datasets = make_ray_datasets(root, [8, 16], with_ids=True)
    assert set(datasets) == {"res8", "res16"}
    assert datasets["res8"].schema().names == ["id", "res8"]  # only that resolution's column is read
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"root": str(root), "dir": str(tmp_path), "batch": BATCH, "per_worker": N // 2},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        datasets=datasets,
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data_test"),
    )
    trainer.fit()
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    ref = {r: {int(i): img for ids, b in iter_images(root, r, 64, with_ids=True) for i, img in zip(ids, b.numpy())}
           for r in (8, 16)}  # fmt: skip
    for key, res in (("0", 8), ("1", 8), ("2", 16)):
        a, b = r0["ids" + key], r1["ids" + key]
        assert len(a) == len(b) == N // 2
        assert not set(a.tolist()) & set(b.tolist()), f"epoch {key}: workers overlap"
        assert sorted(a.tolist() + b.tolist()) == list(range(N)), f"epoch {key}: not every image once"
        flipped = 0
        for ids, imgs in ((a, r0["img" + key]), (b, r1["img" + key])):
            for i, img in zip(ids, imgs):
                want = ref[res][int(i)]
                assert np.array_equal(img, want) or np.array_equal(img, want[..., ::-1])
                flipped += not np.array_equal(img, want)
        assert 0.3 * N < flipped < 0.7 * N
    assert not np.array_equal(np.concatenate([r0["ids0"], r1["ids0"]]), np.concatenate([r0["ids1"], r1["ids1"]]))
