"""synthetic: determinism, factors visible in the pixels and stored as labels, manifest, speed."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline import synthetic
from data_pipeline.format import open_manifest
from data_pipeline.stream import iter_images, read_labels


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "ds"
    synthetic.run([str(out), "--num-images", "300", "--resolution", "32", "--seed", "7", "-q"])
    return out


def test_manifest_declares_synthetic_factors(syn):
    m = open_manifest(syn)
    assert m["num_images"] == 300 and m["resolutions"] == [4, 8, 16, 32]
    assert m["synthetic"]["seed"] == 7 and m["source"]["kind"] == "synthetic"
    kinds = {s["name"]: (s["kind"], s.get("num_classes")) for s in m["labels"]}
    assert kinds == {
        "background": ("categorical", 4), "shape": ("categorical", 4), "color": ("categorical", 6),
        "size": ("continuous", None), "pos_x": ("continuous", None), "pos_y": ("continuous", None),
        "orientation": ("continuous", None),
    }  # fmt: skip
    assert m["skipped"] == []


def test_labels_are_the_generating_factors(syn):
    ids, labels = read_labels(syn)
    assert list(ids) == list(range(300))
    for i in (0, 1, 123, 299):
        f, _ = synthetic.draw_factors(7, i)
        for k, v in f.items():
            assert labels[k][i] == pytest.approx(v, rel=1e-6), k
    # all classes occur, continuous factors cover their range
    for k, n in (("background", 4), ("shape", 4), ("color", 6)):
        assert set(labels[k]) == set(range(n))
    assert labels["size"].min() < 0.18 and labels["size"].max() > 0.26


def test_factors_are_visible_in_pixels(syn):
    _, labels = read_labels(syn)
    images = np.concatenate([b.numpy() for b in iter_images(syn, 32, 64)]).astype(int)
    bgs = np.array(list(synthetic.BACKGROUNDS.values()))
    cols = np.array(list(synthetic.COLORS.values()))
    for i in range(len(images)):
        corner = images[i, :, 1, 1]  # background always (shape lies inside [0.35-0.28*1.2, ...])
        assert np.abs(corner - bgs[labels["background"][i]]).max() <= 40
        cx = int(labels["pos_x"][i] * 32)
        cy = int(labels["pos_y"][i] * 32)
        centre = images[i, :, cy, cx]  # every shape covers its centre
        assert np.abs(centre - cols[labels["color"][i]]).max() <= 45
    # size: bigger shapes cover more pixels far from the background colour
    cover = np.abs(images - bgs[labels["background"]][:, :, None, None]).max(axis=1) > 60
    area = cover.mean(axis=(1, 2))
    circles = labels["shape"] == 0
    assert np.corrcoef(area[circles], labels["size"][circles] ** 2)[0, 1] > 0.9


def test_deterministic_and_independent_of_n(syn, tmp_path):
    synthetic.run([str(tmp_path / "a"), "-n", "300", "-r", "32", "--seed", "7", "-q", "-j", "2"])
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((syn / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    synthetic.run([str(tmp_path / "c"), "-n", "20", "-r", "32", "--seed", "7", "-q"])
    synthetic.run([str(tmp_path / "d"), "-n", "20", "-r", "32", "--seed", "8", "-q"])
    first = pq.read_table(syn / b["shards"][0]["file"], columns=["res32"])["res32"].to_pylist()[:20]
    small = pq.read_table(tmp_path / "c" / "shards" / "shard-00000.parquet", columns=["res32"])["res32"].to_pylist()
    other = pq.read_table(tmp_path / "d" / "shards" / "shard-00000.parquet", columns=["res32"])["res32"].to_pylist()
    assert first == small
    assert sum(x != y for x, y in zip(first, other)) == 20


def test_demo_sizes_are_fast(tmp_path):
    t0 = time.perf_counter()
    synthetic.run([str(tmp_path / "demo"), "-n", "1024", "-r", "64", "-q"])
    assert time.perf_counter() - t0 < 20  # a few seconds on 2 cores; generous bound for loaded CI machines


def test_cli_errors(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "x"), "-n", "0", "-r", "32"]) == 2
    assert "--num-images must be at least 1" in capsys.readouterr().err
    assert synthetic.main([str(tmp_path / "x"), "-n", "4", "-r", "30"]) == 2
    assert "power of two" in capsys.readouterr().err


def test_rotation_zero_draws_upright_shapes_and_keeps_the_other_factors(syn, tmp_path, capsys):
    out = tmp_path / "upright"
    synthetic.run([str(out), "-n", "300", "-r", "32", "--seed", "7", "--rotation", "0", "-q"])
    m = open_manifest(out)
    assert [s["name"] for s in m["labels"]] == ["background", "shape", "color", "size", "pos_x", "pos_y"]
    assert m["synthetic"]["rotation"] == 0
    _, up = read_labels(out)
    _, rot = read_labels(syn)
    for k in ("background", "shape", "color", "size", "pos_x", "pos_y"):
        assert np.array_equal(up[k], rot[k]), k
    bgs = np.array(list(synthetic.BACKGROUNDS.values()))

    def fill(images, labels):  # covered pixels / their bounding box, per square
        cover = np.abs(images - bgs[labels["background"]][:, :, None, None]).max(axis=1) > 100
        out = []
        for c in cover[labels["shape"] == 1]:
            ys, xs = np.nonzero(c)
            out.append(c.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        return np.array(out)

    up_img = np.concatenate([b.numpy() for b in iter_images(out, 32, 64)]).astype(int)
    rot_img = np.concatenate([b.numpy() for b in iter_images(syn, 32, 64)]).astype(int)
    assert fill(up_img, up).mean() > 0.95  # an axis-aligned square fills its bounding box (edges anti-aliased)
    assert fill(rot_img, rot).mean() < 0.85  # rotated ones do not, on average
    # the upright data set is another data set: writing it into the rotated one's directory is refused, and
    # the rotated one stays as it was
    before = (syn / "manifest.json").read_text()
    capsys.readouterr()
    assert synthetic.main([str(syn), "-n", "300", "-r", "32", "--seed", "7", "--rotation", "0", "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (syn / "manifest.json").read_text() == before
    assert synthetic.main([str(tmp_path / "y"), "-n", "4", "-r", "32", "--rotation", "-5"]) == 2
    assert "--rotation must be between 0 and 360 degrees, got -5." in capsys.readouterr().err


def test_size_and_position_ranges_move_only_those_factors(syn, tmp_path, capsys):
    out = tmp_path / "big"
    synthetic.run([str(out), "-n", "300", "-r", "32", "--seed", "7", "--size", "0.3", "0.4", "--position", "0.4",
                   "0.6", "-q"])
    m = open_manifest(out)
    ranges = {s["name"]: s.get("range") for s in m["labels"]}
    assert ranges["size"] == [0.3, 0.4] and ranges["pos_x"] == ranges["pos_y"] == [0.4, 0.6]
    assert m["synthetic"]["size"] == [0.3, 0.4] and m["synthetic"]["position"] == [0.4, 0.6]
    assert m["fingerprint"] != open_manifest(syn)["fingerprint"]
    _, big = read_labels(out)
    _, small = read_labels(syn)
    for k in ("background", "shape", "color", "orientation"):
        assert np.array_equal(big[k], small[k]), k
    assert 0.3 <= big["size"].min() and big["size"].max() <= 0.4 and big["size"].max() > 0.38
    for k in ("pos_x", "pos_y"):
        assert 0.4 <= big[k].min() and big[k].max() <= 0.6
    bgs = np.array(list(synthetic.BACKGROUNDS.values()))

    def covered(path, labels):  # object pixels per image
        images = np.concatenate([b.numpy() for b in iter_images(path, 32, 64)]).astype(int)
        return (np.abs(images - bgs[labels["background"]][:, :, None, None]).max(axis=1) > 100).sum(axis=(1, 2))

    ratio = covered(out, big) / covered(syn, small)
    expect = (big["size"] / small["size"]) ** 2  # area grows with the radius squared
    assert np.median(np.abs(ratio / expect - 1)) < 0.1
    # ranges that would put a radius outside the image are one sentence, and nothing is written
    capsys.readouterr()
    assert synthetic.main([str(tmp_path / "x"), "-n", "4", "-r", "32", "--size", "0.3", "0.45"]) == 2
    err = capsys.readouterr().err
    assert "--position 0.35 0.65 would put shapes of radius up to 0.45 partly outside the image" in err
    assert synthetic.main([str(tmp_path / "x"), "-n", "4", "-r", "32", "--size", "0.3", "0.2"]) == 2
    assert "--size needs 0 < LO <= HI <= 0.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
