"""prepare: bad inputs, colour modes, EXIF, resizing, box-filter levels, zip/FFHQ layout, labels, resume."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline import prepare
from data_pipeline.builder import DatasetInterrupted
from data_pipeline.format import DatasetError, open_manifest

R = 32
REPO = Path(__file__).resolve().parents[1]


def _rng_image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so JPEG/resize behave like photos, plus some high-frequency detail
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    img += rng.integers(-20, 21, img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def messy_source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("messy")
    sub = src / "sub" / "deeper"
    sub.mkdir(parents=True)
    Image.fromarray(_rng_image(1, R, R)).save(src / "good.png")
    pal = Image.fromarray(_rng_image(2, R, R)).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(src / "palette.png")
    rgba = np.dstack([_rng_image(3, R, R), np.tile(np.linspace(0, 255, R).astype(np.uint8), (R, 1))])
    Image.fromarray(rgba, "RGBA").save(sub / "rgba.png")
    Image.fromarray(_rng_image(4, R, R)[..., 0], "L").save(src / "gray.jpg", quality=95)
    Image.fromarray(_rng_image(5, 40, 56)).save(src / "nonsquare.png")  # 56 wide, 40 high
    # EXIF orientation 6 (rotate 90 clockwise): stored as 64x32 with left half red, right half blue.
    ex = np.zeros((32, 64, 3), np.uint8)
    ex[:, :32] = (255, 0, 0)
    ex[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(ex).save(src / "exif.png", exif=exif.tobytes())
    buf = io.BytesIO()
    Image.fromarray(_rng_image(6, 64, 64)).save(buf, "JPEG", quality=90)
    (sub / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("this is not an image\n")
    (src / "notes.txt").write_text("ignored: not an image extension\n")
    return src


GOOD = ["exif.png", "good.png", "gray.jpg", "nonsquare.png", "palette.png", "sub/deeper/rgba.png"]
BAD = {"empty.png": "zero bytes", "text.png": "not an image", "sub/deeper/truncated.jpg": "truncated"}


def _read_all(out: Path) -> dict[str, dict]:
    """path -> {column: value} for every row of every shard in the manifest."""
    m = open_manifest(out)
    rows = {}
    for s in m["shards"]:
        t = pq.read_table(out / s["file"])
        for row in t.to_pylist():
            rows[row["path"]] = row
    return rows


def _img(row: dict, r: int) -> np.ndarray:
    return np.frombuffer(row[f"res{r}"], np.uint8).reshape(3, r, r)


@pytest.fixture(scope="module")
def prepared(messy_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "ds"
    prepare.run([str(messy_source), str(out), "--resolution", str(R), "--workers", "2", "--shard-size", "4", "-q"])
    return out


def test_bad_files_are_skipped_with_reason(prepared):
    m = open_manifest(prepared)
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert skipped == BAD
    assert m["num_images"] == len(GOOD)
    assert m["source"]["num_ignored_non_images"] == 1
    assert m["resolutions"] == [4, 8, 16, 32]
    assert sum(s["rows"] for s in m["shards"]) == len(GOOD)


def test_every_good_file_at_every_resolution(prepared):
    rows = _read_all(prepared)
    assert sorted(rows) == GOOD
    for row in rows.values():
        for r in (4, 8, 16, 32):
            assert len(row[f"res{r}"]) == 3 * r * r


def test_box_filter_levels_match_numpy(prepared):
    rows = _read_all(prepared)
    for row in rows.values():
        top = _img(row, R).astype(np.float64)
        for r in (16, 8, 4):
            k = R // r
            direct = top.reshape(3, r, k, r, k).mean(axis=(2, 4))
            assert np.array_equal(_img(row, r), np.clip(np.rint(direct), 0, 255).astype(np.uint8)), (row["path"], r)


def test_exact_size_kept_as_is_and_modes_converted(prepared, messy_source):
    rows = _read_all(prepared)
    good = np.asarray(Image.open(messy_source / "good.png"))
    assert np.array_equal(_img(rows["good.png"], R).transpose(1, 2, 0), good)
    pal = np.asarray(Image.open(messy_source / "palette.png").convert("RGB"))
    assert np.array_equal(_img(rows["palette.png"], R).transpose(1, 2, 0), pal)
    rgba = np.asarray(Image.open(messy_source / "sub/deeper/rgba.png")).astype(np.float64)
    over_black = rgba[..., :3] * rgba[..., 3:] / 255.0
    got = _img(rows["sub/deeper/rgba.png"], R).transpose(1, 2, 0).astype(np.float64)
    assert np.abs(got - over_black).max() <= 1.0
    gray = _img(rows["gray.jpg"], R)
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    assert np.array_equal(gray[0], np.asarray(Image.open(messy_source / "gray.jpg")))


def test_non_square_is_centre_cropped_and_lanczos_resized(prepared, messy_source):
    rows = _read_all(prepared)
    src = Image.open(messy_source / "nonsquare.png")
    expected = np.asarray(src.crop((8, 0, 48, 40)).resize((R, R), Image.LANCZOS))
    assert np.array_equal(_img(rows["nonsquare.png"], R).transpose(1, 2, 0), expected)
    assert open_manifest(prepared)["num_resized"] == 2  # nonsquare and exif (64x32 -> 32x64 -> crop)


def test_exif_orientation_is_honoured(prepared):
    img = _img(_read_all(prepared)["exif.png"], R).astype(int)
    # Rotated 90 deg clockwise, the red left half becomes the top half and blue the bottom half.
    top, bottom = img[:, : R // 2 - 2], img[:, R // 2 + 2 :]
    assert top[0].mean() > 200 and top[2].mean() < 50
    assert bottom[2].mean() > 200 and bottom[0].mean() < 50


def test_no_resize_rejects_wrong_size(messy_source, tmp_path):
    out = tmp_path / "ds"
    m = prepare.run([str(messy_source), str(out), "-r", str(R), "--no-resize", "-j", "1", "-q"])
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons["nonsquare.png"].startswith("wrong size 56x40")
    assert reasons["exif.png"].startswith("wrong size 32x64")
    assert m["num_images"] == len(GOOD) - 2


def _cli(*args: str, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_cli_summary_strict_and_clear_errors(messy_source, tmp_path):
    ok = _cli(str(messy_source), str(tmp_path / "a"), "-r", "16", "-j", "1")
    assert ok.returncode == 0, ok.stderr
    assert "skipped: 3" in ok.stdout and "used: 6" in ok.stdout and "truncated" in ok.stdout
    again = _cli(str(messy_source), str(tmp_path / "a"), "-r", "16", "-j", "1")
    assert again.returncode == 0 and "already complete" in again.stderr

    strict = _cli(str(messy_source), str(tmp_path / "b"), "-r", "16", "-j", "1", "--strict")
    assert strict.returncode == 2
    assert "--strict" in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "b" / "manifest.json").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    res = _cli(str(empty), str(tmp_path / "c"), "-r", "16")
    assert res.returncode == 2 and "contains no image files" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli(str(messy_source), str(blocker / "out"), "-r", "16")
    assert res.returncode == 2 and "Cannot create OUT" in res.stderr and "Traceback" not in res.stderr

    res = _cli(str(tmp_path / "missing"), str(tmp_path / "d"), "-r", "16")
    assert res.returncode == 2 and "does not exist" in res.stderr

    res = _cli(str(messy_source), str(tmp_path / "e"), "-r", "48")
    assert res.returncode == 2 and "power of two" in res.stderr

    res = _cli(str(messy_source), str(tmp_path / "a"), "-r", "8", "-j", "1")  # other settings, same OUT
    assert res.returncode == 2 and "--overwrite" in res.stderr


def test_not_enough_disk_is_one_sentence(messy_source, tmp_path, monkeypatch):
    import data_pipeline.builder as builder

    monkeypatch.setattr(builder.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    with pytest.raises(DatasetError, match=r"^Not enough disk space in OUT .*: about .* needed, 10 B free\.$"):
        prepare.run([str(messy_source), str(tmp_path / "ds"), "-r", str(R), "-q"])


def test_zip_and_ffhq_layout_match_folder(tmp_path):
    folder = tmp_path / "ffhq" / "images1024x1024"
    for i in range(7):
        d = folder / f"{(i // 3) * 1000:05d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rng_image(100 + i, 2 * R, 2 * R)).save(d / f"{(i // 3) * 1000 + i % 3:05d}.png")
    zpath = tmp_path / "ffhq.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(folder.rglob("*.png"), reverse=True):  # order inside the zip must not matter
            zf.write(p, p.relative_to(tmp_path / "ffhq").as_posix())
        zf.writestr("__MACOSX/._junk.png", b"junk")
        zf.writestr("LICENSE.txt", "text")
    m1 = prepare.run([str(tmp_path / "ffhq"), str(tmp_path / "o1"), "-r", str(R), "-j", "1", "-q"])
    m2 = prepare.run([str(zpath), str(tmp_path / "o2"), "-r", str(R), "-j", "2", "-q"])
    assert m1["num_images"] == m2["num_images"] == 7 and not m1["skipped"] and not m2["skipped"]
    assert m2["source"]["kind"] == "zip"
    r1, r2 = _read_all(tmp_path / "o1"), _read_all(tmp_path / "o2")
    assert list(r1) == list(r2)
    assert list(r1)[:4] == [f"images1024x1024/00000/0000{i}.png" for i in range(3)] + [
        "images1024x1024/01000/01000.png"
    ]
    for path in r1:
        assert r1[path]["id"] == r2[path]["id"]
        for r in (4, 8, 16, 32):
            assert r1[path][f"res{r}"] == r2[path][f"res{r}"]
    # a 2R image is Lanczos-resized from 2R to R
    src = Image.open(folder / "00000" / "00000.png")
    assert np.array_equal(_img(r1["images1024x1024/00000/00000.png"], R).transpose(1, 2, 0),
                          np.asarray(src.resize((R, R), Image.LANCZOS)))  # fmt: skip


def test_labels_csv_and_json(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_rng_image(i, R, R)).save(src / f"img{i}.png")
    (src / "labels.csv").write_text(
        "file,smiling,age,hair\n"
        + "\n".join(f"img{i}.png,{i % 2 * 2 - 1},{20 + 3.5 * i},{'ab'[i % 2]}" for i in range(4))
    )
    m = prepare.run([str(src), str(tmp_path / "o"), "-r", "8", "--labels", str(src / "labels.csv"), "-q", "-j", "1"])
    spec = {s["name"]: s for s in m["labels"]}
    assert spec["smiling"]["kind"] == "categorical" and spec["smiling"]["classes"] == [-1, 1]
    assert spec["age"]["kind"] == "continuous"
    assert spec["hair"]["classes"] == ["a", "b"]
    assert m["skipped"] == [{"path": "img4.png", "reason": "no label in the label file"}]
    from data_pipeline.stream import read_labels

    ids, labels = read_labels(tmp_path / "o")
    assert list(ids) == [0, 1, 2, 3]
    assert list(labels["smiling"]) == [0, 1, 0, 1]
    assert np.allclose(labels["age"], [20, 23.5, 27, 30.5])
    (src / "dataset.json").write_text(json.dumps({"labels": [[f"img{i}.png", i % 3] for i in range(5)]}))
    m = prepare.run([str(src), str(tmp_path / "o2"), "-r", "8", "--labels", str(src / "dataset.json"), "-q"])
    assert m["labels"][0]["name"] == "class" and m["labels"][0]["num_classes"] == 3
    ids, labels = read_labels(tmp_path / "o2")
    assert list(labels["class"]) == [0, 1, 2, 0, 1]


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def many_source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("many")
    for i in range(40):
        Image.fromarray(_rng_image(1000 + i, R, R)).save(src / f"{i:03d}.png")
    (src / "017.png").write_bytes(b"")  # one bad file mid-way
    return src


def _digests(out: Path) -> dict[str, str]:
    m = json.loads((out / "manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in m["shards"]}


def test_interrupt_and_rerun_equals_clean_run(many_source, tmp_path):
    args = ["-r", str(R), "--shard-size", "6", "--rows-per-group", "4", "-q"]
    clean = tmp_path / "clean"
    prepare.run([str(many_source), str(clean), "-j", "1", *args])

    out = tmp_path / "resumed"
    with pytest.raises(DatasetInterrupted):
        prepare.run([str(many_source), str(out), "-j", "1", *args], stop_after_shards=3)
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert finished == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    before = {n: (out / "shards" / n).stat().st_mtime_ns for n in finished}
    (out / "shards" / "shard-00004.parquet.tmp").write_bytes(b"half-written garbage")
    # a shard written but not yet recorded (crash between os.replace and the state update) is redone
    shutil.copy(clean / "shards" / "shard-00003.parquet", out / "shards" / "shard-00003.parquet")
    with pytest.raises(DatasetError, match="OUT .* already holds a dataset"):
        prepare.run([str(many_source), str(out), "-j", "1", "-r", "16", "-q"])  # other settings refuse
    time.sleep(0.01)
    m = prepare.run([str(many_source), str(out), "-j", "2", *args])
    assert {n: (out / "shards" / n).stat().st_mtime_ns for n in finished} == before  # not redone
    assert not list((out / "shards").glob("*.tmp"))
    assert _digests(out) == _digests(clean)
    for s in m["shards"]:
        assert Path(out / s["file"]).stat().st_size == s["bytes"]
    ids = np.concatenate([pq.read_table(out / s["file"], columns=["id"])["id"].to_numpy() for s in m["shards"]])
    assert len(ids) == len(set(ids)) == 39 and 17 not in ids
    assert m["skipped"] == [{"path": "017.png", "reason": "zero bytes"}]


@pytest.mark.slow
def test_killed_process_resumes_to_identical_shards(tmp_path):
    """A real SIGKILL of the synthetic CLI mid-run, then a re-run: same shards as one clean run."""
    args = ["--num-images", "1200", "-r", "64", "--shard-size", "40", "--rows-per-group", "8", "-j", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(clean), *args, "-q"], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.synthetic", str(out), *args, "-q"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / "shards").glob("*.parquet")))
    assert 3 <= done_before < 30 and not (out / "manifest.json").exists()
    res = subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", str(out), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    assert _digests(out) == _digests(clean)


def test_concurrent_run_on_same_out_is_refused(many_source, tmp_path):
    from data_pipeline.builder import _lock_out

    out = tmp_path / "ds"
    out.mkdir()
    held = _lock_out(out)
    try:
        with pytest.raises(DatasetError, match="Another prepare/synthetic run is writing to OUT"):
            prepare.run([str(many_source), str(out), "-r", "8", "-q"])
    finally:
        held.close()
    assert prepare.run([str(many_source), str(out), "-r", "8", "-q", "-j", "1"])["num_images"] == 39
