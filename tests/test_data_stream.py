"""LocalBatchSource, iter_images, read_labels, open_manifest (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import synthetic
from data_pipeline.format import DatasetError, open_manifest
from data_pipeline.stream import LocalBatchSource, iter_images, read_labels

N = 240


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "ds"
    # 8-row row groups and a 4-block window so that the windowed shuffle, not one global shuffle, is tested
    synthetic.run([str(out), "-n", str(N), "-r", "16", "--seed", "3", "--shard-size", "32",
                   "--rows-per-group", "8", "-q"])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference(ds):
    """id -> {R: CHW uint8} straight from iter_images (unshuffled, unmirrored)."""
    ref = {}
    for r in (4, 8, 16):
        for ids, batch in iter_images(ds, r, 50, with_ids=True):
            for i, img in zip(ids, batch.numpy()):
                ref.setdefault(int(i), {})[r] = img
    return ref


def _match(img: np.ndarray, ref: np.ndarray) -> str:
    if np.array_equal(img, ref):
        return "same"
    if np.array_equal(img, ref[..., ::-1]):
        return "flipped"
    return "different"


def test_iter_images_every_image_once_in_id_order(ds):
    batches = list(iter_images(ds, 8, 64, with_ids=True))
    assert [len(ids) for ids, _ in batches] == [64, 64, 64, 48]
    ids = np.concatenate([i for i, _ in batches])
    assert list(ids) == list(range(N))
    b = batches[0][1]
    assert b.dtype == torch.uint8 and b.shape == (64, 3, 8, 8) and b.is_contiguous()
    b[0, 0, 0, 0] = 1  # writable


def test_batches_shape_dtype_and_epoch_coverage(ds, reference):
    src = LocalBatchSource(ds, seed=1)
    assert src.resolutions == [4, 8, 16] and src.max_resolution == 16 and src.num_images == N
    it = src.batches(16, 24, with_ids=True)
    seen, flips = [], 0
    for _ in range(N // 24):
        ids, b = next(it)
        assert b.shape == (24, 3, 16, 16) and b.dtype == torch.uint8 and b.is_contiguous()
        for i, img in zip(ids, b.numpy()):
            kind = _match(img, reference[int(i)][16])
            assert kind != "different"
            flips += kind == "flipped"
        seen.extend(ids.tolist())
    assert sorted(seen) == list(range(N))  # one epoch = every image once
    assert 0.35 * N < flips < 0.65 * N
    assert seen != sorted(seen)
    ids2, _ = next(it)  # next epoch: a different order
    assert src.epoch == 1 and list(ids2) != seen[:24]


def test_no_mirror_no_shuffle(ds, reference):
    src = LocalBatchSource(ds, mirror=False, shuffle=False)
    ids, b = next(src.batches(8, 40, with_ids=True))
    assert list(ids) == list(range(40))
    for i, img in zip(ids, b.numpy()):
        assert np.array_equal(img, reference[int(i)][8])


def test_two_ranks_disjoint_and_complete_with_resolution_switch(ds, reference):
    per_rank = []
    for rank in (0, 1):
        src = LocalBatchSource(ds, rank=rank, world_size=2, seed=5)
        ids = []
        it = src.batches(4, 20, with_ids=True)
        for _ in range(2):
            ids.extend(next(it)[0].tolist())
        it = src.batches(16, 20, with_ids=True)  # resolution grows mid-epoch: the epoch goes on
        for _ in range(4):
            i, b = next(it)
            assert b.shape[-1] == 16
            for k, img in zip(i, b.numpy()):
                assert _match(img, reference[int(k)][16]) != "different"
            ids.extend(i.tolist())
        assert src.epoch == 0 and src.position == 120
        per_rank.append(ids)
    assert len(set(per_rank[0])) == len(set(per_rank[1])) == 120
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N))


def test_resume_is_bit_identical_across_epochs_and_resolutions(ds):
    src = LocalBatchSource(ds, seed=11, rank=1, world_size=2)
    it = src.batches(8, 16)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(src.state_dict()))  # picklable/JSON-able
    expected = [next(it) for _ in range(9)]  # crosses the epoch boundary (120 images per rank)
    expected += [next(src.batches(16, 16)) for _ in range(1)]
    resumed = LocalBatchSource(ds, seed=999, rank=1, world_size=2, prefetch=0)
    resumed.load_state_dict(state)
    it2 = resumed.batches(8, 16)
    got = [next(it2) for _ in range(9)] + [next(resumed.batches(16, 16))]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.state_dict() == src.state_dict()


def test_old_iterator_stops_after_new_one(ds):
    src = LocalBatchSource(ds)
    old = src.batches(4, 8)
    next(old)
    new = src.batches(8, 8)
    next(new)
    with pytest.raises(StopIteration):
        next(old)
    assert src.position == 16


def test_memory_window_is_bounded(ds):
    src = LocalBatchSource(ds, shuffle_blocks=4, prefetch=0)
    # drive the producer directly and watch its block cache
    from data_pipeline.stream import _BlockCache

    sizes = []
    original = _BlockCache.get

    def spy(self, block):
        out = original(self, block)
        sizes.append(len(self.data))
        return out

    _BlockCache.get = spy
    try:
        it = src.batches(16, 8)
        for _ in range(N // 8):
            next(it)
    finally:
        _BlockCache.get = original
    assert max(sizes) <= 8  # two windows of 4 blocks at most


def test_windowed_order_is_a_permutation_per_rank(ds):
    src = LocalBatchSource(ds, seed=2, shuffle_blocks=4)
    orders = [src.epoch_rows(e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(N))
    assert not np.array_equal(orders[0], orders[1])


def test_read_labels_matches_factors(ds):
    ids, labels = read_labels(ds)
    assert list(ids) == list(range(N))
    f, _ = synthetic.draw_factors(3, 17)
    assert labels["shape"][17] == f["shape"] and labels["orientation"][17] == pytest.approx(f["orientation"])
    assert labels["shape"].dtype == np.int64 and labels["size"].dtype == np.float32


def test_open_manifest_errors(ds, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_manifest(tmp_path / "nope")
    with pytest.raises(DatasetError, match="has no manifest.json"):
        open_manifest(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    m = json.loads((ds / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="format version 99"):
        open_manifest(bad)
    with pytest.raises(DatasetError, match="Resolution 32 is not in this dataset"):
        LocalBatchSource(ds).batches(32, 8)
    with pytest.raises(DatasetError, match="Batch size"):
        LocalBatchSource(ds, world_size=2).batches(8, 121)
