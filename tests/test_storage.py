"""storage: one API for local paths and object-store URIs, checked on the local disk and on a real S3-protocol
server (moto's, on 127.0.0.1); datasets, checkpoints and the FID cache read and written through it."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from data_pipeline.stream import DatasetError, LocalBatchSource, iter_images, open_manifest
from stylegan_dist import checkpoint as ckpt_mod
from stylegan_dist import storage
from stylegan_dist.metrics import frechet


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3")
    return f"s3://bucket/t-{request.node.name.split('[')[0]}-{tmp_path.name}"


def test_write_read_list_move_delete(root):
    a = storage.join(root, "dir", "a.txt")
    assert not storage.exists(a) and storage.list_dir(storage.join(root, "dir")) == []
    storage.write_text(a, "one")
    storage.write_bytes(storage.join(root, "dir", "b.bin"), b"\x00\x01")
    assert storage.read_text(a) == "one" and storage.is_file(a) and storage.is_dir(storage.join(root, "dir"))
    assert storage.list_dir(storage.join(root, "dir")) == ["a.txt", "b.bin"]
    storage.write_text(a, "two")  # replaced whole
    assert storage.read_text(a) == "two"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))
    moved = storage.move(storage.join(root, "dir"), storage.join(root, "dir.old"))
    assert storage.read_text(storage.join(moved, "a.txt")) == "two" and not storage.exists(storage.join(root, "dir"))
    storage.delete(moved)
    assert not storage.exists(moved)
    # no temporary files left behind by the atomic writes
    assert storage.list_dir(root) == []


def test_join_parent_name_resolve(tmp_path):
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"
    assert storage.parent("s3://b/p/x") == "s3://b/p" and storage.name("s3://b/p/x/") == "x"
    assert storage.resolve(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.is_relative("runs") and not storage.is_relative("/abs") and not storage.is_relative("s3://b/r")
    assert storage.local_path("s3://b/x") is None and storage.local_path("x") is not None


def test_checkpoint_roundtrip_and_prune(root):
    d = storage.join(root, "checkpoints")
    for n in (64, 128, 192):
        ckpt_mod.atomic_save({"format": ckpt_mod.FORMAT_VERSION, "state": {"cur_nimg": n}, "w": torch.ones(3) * n},
                             storage.join(d, ckpt_mod.checkpoint_name(n)))
    ckpt_mod.prune_checkpoints(d, 2)
    kept = ckpt_mod.list_checkpoints(d)
    assert [storage.name(p) for p in kept] == [ckpt_mod.checkpoint_name(128), ckpt_mod.checkpoint_name(192)]
    ck = ckpt_mod.load_checkpoint(ckpt_mod.latest_checkpoint(d))
    assert ck["state"]["cur_nimg"] == 192 and torch.equal(ck["w"], torch.full((3,), 192.0))
    with pytest.raises(ckpt_mod.CheckpointError, match="does not exist"):
        ckpt_mod.load_checkpoint(storage.join(d, "ckpt-9999999999.pt"))
    storage.write_bytes(storage.join(d, "ckpt-0000000001.pt"), b"not a checkpoint")
    with pytest.raises(ckpt_mod.CheckpointError, match="truncated"):
        ckpt_mod.load_checkpoint(storage.join(d, "ckpt-0000000001.pt"))


def test_fid_cache_through_storage(root):
    path = frechet.cache_path(storage.join(root, "cache"), "k1")
    mu, sigma = np.arange(3.0), np.eye(3)
    frechet.save_cached_stats(path, "k1", 10, mu, sigma)
    count, mu2, sigma2 = frechet.load_cached_stats(path, "k1")
    assert count == 10 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert frechet.load_cached_stats(path, "other") is None
    assert frechet.load_cached_stats(frechet.cache_path(storage.join(root, "cache"), "k2"), "k2") is None


def test_dataset_from_s3_reads_the_same_batches(s3, dataset):
    uri = "s3://bucket/data/shapes16"
    storage.copy_tree(dataset, uri)
    assert open_manifest(uri)["num_images"] == open_manifest(dataset)["num_images"]
    local = LocalBatchSource(dataset, seed=3, prefetch=0)
    remote = LocalBatchSource(uri, seed=3, prefetch=0)
    it_l, it_r = local.batches(16, 8), remote.batches(16, 8)
    for _ in range(5):
        assert torch.equal(next(it_l), next(it_r))
    assert remote.state_dict() == local.state_dict()
    first_l = next(iter_images(dataset, 8, 32))
    first_r = next(iter_images(uri, 8, 32))
    assert torch.equal(first_l, first_r)


def test_bad_locations_one_sentence(s3):
    with pytest.raises(storage.StorageError, match="bucket 'nobucket' .* does not exist"):
        storage.check_location("s3://nobucket/runs")
    with pytest.raises(DatasetError, match="does not exist"):
        open_manifest("s3://bucket/no/such/data")
    storage.write_text("s3://bucket/notdata/readme.txt", "hello")
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_manifest("s3://bucket/notdata")


def test_unreachable_endpoint_is_one_sentence(tmp_path):
    from services import free_port

    code = ("from stylegan_dist import storage\n"
            "try:\n    storage.check_location('s3://bucket/runs')\n"
            "except storage.StorageError as e:\n    print('ERR', e)\n")
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("ERR Cannot reach the object store"), r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1


def test_relative_storage_refused_under_a_ray_job(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(storage.StorageError, match="relative path inside a Ray job"):
        storage.check_storage_arg("runs")
    assert storage.check_storage_arg(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv(storage.STORAGE_ENV, str(tmp_path / "default"))
    assert storage.check_storage_arg(None) == str(tmp_path / "default")
    assert not (tmp_path / "default").exists()  # checking writes nothing


def test_weight_file_from_s3_is_cached_per_version(s3, monkeypatch, tmp_path):
    from stylegan_dist.metrics.registry import MetricError
    from stylegan_dist.metrics.weights import resolve_weight

    monkeypatch.setenv("HOME", str(tmp_path))  # the per-machine copy goes under ~/.cache
    monkeypatch.setenv("STYLEGAN_WEIGHTS_DIR", "s3://bucket/weights")
    with pytest.raises(MetricError, match="was not found at s3://bucket/weights/attribute_classifier.pt"):
        resolve_weight("classifier")
    storage.write_bytes("s3://bucket/weights/attribute_classifier.pt", b"one")
    first = resolve_weight("classifier")
    assert first.read_bytes() == b"one" and str(first).startswith(str(tmp_path))
    assert resolve_weight("classifier") == first  # cached
    storage.write_bytes("s3://bucket/weights/attribute_classifier.pt", b"two!")
    assert resolve_weight("classifier").read_bytes() == b"two!"
