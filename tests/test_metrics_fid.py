"""FID: Fréchet distance math, exact combination of per-worker statistics, the real-statistics cache,
and the FID Inception's weight-file format."""

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import tiny_config

from stylegan_dist.metrics import MetricError, MetricOptions, calc_metric, frechet
from stylegan_dist.metrics.fid import fake_stats_partial, fid_from_partials
from stylegan_dist.metrics.frechet import FeatureStats, frechet_distance
from stylegan_dist.metrics.inception import FIDInceptionV3, load_inception
from stylegan_dist.metrics.testing import TinyExtractor, make_synthetic_dataset, run_ranks
from stylegan_dist.metrics.weights import resolve_weight
from stylegan_dist.networks import build_generator


@pytest.fixture(scope="module")
def synthetic32(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes32", num_images=256, resolution=32)


def scipy_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def stats_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStats(x.shape[1])
    s.append(x)
    return s.mean_cov()


@pytest.mark.parametrize("n,d", [(400, 32), (300, 64), (50, 16)])
def test_frechet_distance_matches_scipy(n, d):
    rng = np.random.default_rng(d)
    x1 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.5
    x2 = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d)
    ours = frechet_distance(*stats_of(x1), *stats_of(x2))
    ref = scipy_fid(x1, x2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_feature_stats_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((257, 12)) * 3 + 1
    mu, cov = stats_of(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    parts = []
    for chunk in np.split(x, [3, 100, 101]):  # uneven slices, one of a single sample
        s = FeatureStats(12)
        s.append(chunk)
        parts.append(s)
    mu2, cov2 = FeatureStats.merge(parts).mean_cov()
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(cov2, cov, rtol=1e-10, atol=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 48)) @ rng.standard_normal((48, 48))
    mu, s = stats_of(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)
    # ...and a shifted copy is exactly the squared shift away.
    assert frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(0.25 * 48, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# The metric end to end on tiny networks and the synthetic dataset


class ReplayGenerator(torch.nn.Module):
    """Returns the dataset's images in order, whatever the latents: FID against the same images is ~0."""

    def __init__(self, images_u8: torch.Tensor):
        super().__init__()
        self.images = images_u8.float() / 127.5 - 1.0
        self.pos = 0
        self.latent_dim, self.num_ws, self.max_resolution = 4, 1, images_u8.shape[-1]
        object.__setattr__(self, "synthesis", self)  # not a submodule (that would recurse)

    def map(self, z, *args, **kw):
        return z[:, None, :]

    def noise_shapes(self, resolution):
        return []

    def forward(self, ws, resolution, alpha=1.0, noise=None):
        out = self.images[self.pos:self.pos + len(ws)]
        self.pos += len(ws)
        return out


def _opts(G, data, tmp_path, extractor, **kw):
    return MetricOptions(G=G, resolution=32, data=str(data), batch_size=16, inception=extractor,
                         cache_dir=str(tmp_path / "cache"), **kw)


def test_fid_metric_of_the_dataset_against_itself(synthetic32, tmp_path):
    from data_pipeline.stream import iter_images

    images = torch.cat(list(iter_images(synthetic32, 32, 64)))[:96]
    res = calc_metric("fid50k", _opts(ReplayGenerator(images), synthetic32, tmp_path, TinyExtractor(), num=96))
    assert abs(res["results"]["fid50k"]) < 1e-6
    # A random generator is far from the data.
    G = build_generator(tiny_config(resolution=32)).eval()
    res = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, TinyExtractor(), num=96))
    assert res["results"]["fid50k"] > 0.01


def test_real_statistics_cache_hit_and_corrupted_file_rebuilt(synthetic32, tmp_path):
    G = build_generator(tiny_config(resolution=32)).eval()
    ext = TinyExtractor()
    num = 64
    first = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=num))["results"]["fid50k"]
    assert ext.calls == 2 * num  # reals + fakes
    files = list((tmp_path / "cache").glob("fid-reals-*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*tmp*"))

    ext.calls = 0
    second = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=num))["results"]["fid50k"]
    assert ext.calls == num  # fakes only: the reals came from the cache
    assert second == first

    # A different sample count or extractor is a different cache entry.
    calc_metric("fid50k", _opts(G, synthetic32, tmp_path, TinyExtractor(seed=1), num=num))
    assert len(list((tmp_path / "cache").glob("fid-reals-*.npz"))) == 2

    # Truncated file: rebuilt, not trusted.
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    ext.calls = 0
    third = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=num))["results"]["fid50k"]
    assert ext.calls == 2 * num and third == pytest.approx(first, rel=1e-9)

    # Readable file with tampered values: the digest no longer matches, so it is rebuilt too.
    with np.load(files[0]) as f:
        fields = {k: f[k] for k in f.files}
    key = str(fields["key"])
    fields["mu"] = fields["mu"] + 1.0
    with open(files[0], "wb") as fh:
        np.savez(fh, **fields)
    assert frechet.load_cached_stats(files[0], key) is None
    ext.calls = 0
    fourth = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=num))["results"]["fid50k"]
    assert ext.calls == 2 * num and fourth == pytest.approx(first, rel=1e-9)


def test_fid_two_workers_equal_one(synthetic32, tmp_path):
    G = build_generator(tiny_config(resolution=32)).eval()
    ext = TinyExtractor()
    single = calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=80))["results"]["fid50k"]

    def rank_fn(rank, gather):
        o = _opts(G, synthetic32, tmp_path / f"fresh{rank}", ext, num=80, rank=rank, world_size=2, gather=gather)
        return calc_metric("fid50k", o)["results"]["fid50k"]

    two = run_ranks(2, rank_fn)
    assert two[0] == two[1]
    assert two[0] == pytest.approx(single, rel=1e-9)


def test_fid_over_a_real_gloo_process_group(synthetic32, tmp_path):
    import json

    import torch.multiprocessing as mp
    from conftest import TINY

    from stylegan_dist.metrics.testing import distributed_worker

    kwargs = {"config": ["model.resolution=32", *TINY], "resolution": 32, "data": synthetic32, "num": 48,
              "batch_size": 16, "cache_dir": str(tmp_path / "cache")}
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), "fid50k", dict(kwargs), str(tmp_path)),
             nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text())["fid50k"] for r in range(2)]
    torch.manual_seed(0)
    G = build_generator(tiny_config(resolution=32)).eval()
    single = calc_metric("fid50k", _opts(G, synthetic32, tmp_path / "single", TinyExtractor(), num=48))
    assert got[0] == got[1] == pytest.approx(single["results"]["fid50k"], rel=1e-9)


def test_partials_combine_to_the_single_process_statistics():
    G = build_generator(tiny_config(resolution=32)).eval()
    ext = TinyExtractor()
    base = MetricOptions(G=G, resolution=32, batch_size=8)
    whole = fake_stats_partial(base, ext, 40)
    parts = [fake_stats_partial(base.replace(rank=r, world_size=3), ext, 40) for r in range(3)]
    assert [p.count for p in parts] == [16, 16, 8]  # chunks of 8: ranks get 2, 2, 1 of the 5 chunks
    real = whole.mean_cov()
    assert fid_from_partials(parts, real) == pytest.approx(fid_from_partials([whole], real), abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.slow
def test_inception_weight_file_loads_strictly(tmp_path):
    net = FIDInceptionV3().randomize(torch.Generator().manual_seed(0))
    path = tmp_path / "pt_inception.pth"
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_inception(path)
    x = (torch.rand(2, 3, 16, 16) * 255).to(torch.uint8)
    feats = loaded(x)
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, net(x))
    assert loaded.ident.startswith("fid-inception-v3:") and loaded.ident != net.ident

    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, path)
    with pytest.raises(MetricError, match="not in the expected format"):
        load_inception(path)


def test_missing_weight_file_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEGAN_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(MetricError) as e:
        resolve_weight("inception")
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "STYLEGAN_INCEPTION_WEIGHTS" in msg
    assert str(tmp_path / "nope.pth") in msg
    assert msg.endswith(".") and ". " not in msg
    monkeypatch.delenv("STYLEGAN_INCEPTION_WEIGHTS")
    monkeypatch.setenv("STYLEGAN_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert resolve_weight("inception") == tmp_path / "pt_inception-2015-12-05-6726825d.pth"


class RecordingExtractor(TinyExtractor):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.cpu())
        return super().forward(images)


@pytest.mark.parametrize("mirror", [True, False])
def test_fid_reals_repeat_the_dataset_and_are_mirrored_when_the_run_mirrored(synthetic32, tmp_path, mirror):
    from data_pipeline.stream import iter_images
    from stylegan_dist.metrics.fid import mirror_mask, real_stats

    data = torch.cat(list(iter_images(synthetic32, 32, 64)))  # 256 images in dataset order
    num = 300
    ext = RecordingExtractor()
    G = build_generator(tiny_config(resolution=32)).eval()
    _, _, count = real_stats(_opts(G, synthetic32, tmp_path, ext, fid_mirror=mirror), ext, num)
    seen = torch.cat(ext.seen)
    assert count == num and len(seen) == num  # the dataset repeated up to the requested count
    expect = data[torch.arange(num) % len(data)]
    mask = torch.from_numpy(mirror_mask(num)) if mirror else torch.zeros(num, dtype=torch.bool)
    expect = torch.where(mask[:, None, None, None], expect.flip(-1), expect)
    assert torch.equal(seen, expect)
    if mirror:
        assert 0.4 < mask.float().mean() < 0.6 and not torch.equal(seen, data[torch.arange(num) % len(data)])
    # two workers read the same reals
    two = run_ranks(2, lambda rank, gather: real_stats(
        _opts(G, synthetic32, tmp_path / f"r{rank}", TinyExtractor(), fid_mirror=mirror, rank=rank, world_size=2,
              gather=gather), TinyExtractor(), num))
    one = real_stats(_opts(G, synthetic32, tmp_path / "one", TinyExtractor(), fid_mirror=mirror), TinyExtractor(), num)
    np.testing.assert_allclose(two[0][0], one[0], rtol=1e-9)
    # the old protocol: at most the dataset, each image once
    _, _, count_once = real_stats(_opts(G, synthetic32, tmp_path / "once", TinyExtractor(), fid_repeat_reals=False),
                                  TinyExtractor(), num)
    assert count_once == len(data)


def test_fid_protocol_follows_the_runs_mirror_setting():
    from stylegan_dist.metrics.training import protocol_params

    cfg = tiny_config("metrics.names=fid50k,ppl_wend", "metrics.num=1000")
    params = protocol_params(cfg)
    assert params["protocol.fid50k.mirror"] == "True" and params["protocol.fid50k.reals"].startswith("1000 ")
    assert params["protocol.ppl_wend.crop"] == "True" and params["protocol.fid50k.precision"].startswith("fp32")
    assert protocol_params(tiny_config("metrics.names=fid50k", "train.mirror=false"))["protocol.fid50k.mirror"] == \
        "False"
    assert protocol_params(tiny_config("metrics.names=fid50k", "metrics.fid_mirror=false"))[
        "protocol.fid50k.mirror"] == "False"


def test_tf32_is_off_while_a_metric_runs(synthetic32, tmp_path):
    class FlagExtractor(TinyExtractor):
        flags = []

        def forward(self, images):
            self.flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return super().forward(images)

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training with tf32 sets
    try:
        G = build_generator(tiny_config(resolution=32)).eval()
        ext = FlagExtractor()
        calc_metric("fid50k", _opts(G, synthetic32, tmp_path, ext, num=16))
        assert ext.flags and set(ext.flags) == {(False, False)}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class IndexMapping(torch.nn.Module):
    """A stand-in G whose w for latent z is z itself, so the latent each layer took can be read back."""

    def __init__(self, num_ws=8, layers=6):
        super().__init__()
        self.num_ws, self.layers, self.latent_dim = num_ws, layers, 1

    def map(self, z, *a, **kw):
        return z[:, None, :].repeat(1, self.num_ws, 1)

    def active_layers(self, resolution):
        return self.layers


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mixed_ws_take_k_latents_in_blocks_split_at_distinct_active_layers(k):
    from stylegan_dist.metrics.fid import mixed_ws

    n = 200
    G = IndexMapping()
    z = torch.arange(k, dtype=torch.float32).repeat(n)[:, None]  # image i's latent j has the value j
    ws = mixed_ws(G, z, k, 32, torch.Generator().manual_seed(0), torch.device("cpu"))[..., 0]  # [n, num_ws]
    assert ws.shape == (n, G.num_ws)
    steps = ws[:, 1:] - ws[:, :-1]
    assert ((steps == 0) | (steps == 1)).all()  # latents in order, each one contiguous block
    assert (ws[:, 0] == 0).all() and (ws[:, G.layers - 1] == k - 1).all()  # all k used within the active layers
    assert (ws[:, G.layers:] == k - 1).all()  # layers above the current resolution keep the last latent
    first_cross = (steps[:, :G.layers - 1] == 1).float().argmax(dim=1) + 1
    assert set(first_cross.tolist()) == set(range(1, G.layers - k + 2))  # every possible position is drawn
    with pytest.raises(MetricError, match="needs 4 synthesis layers at 32x32, which has 3"):
        mixed_ws(IndexMapping(layers=3), torch.zeros(8, 1), 4, 32, torch.Generator(), torch.device("cpu"))


def test_fid_with_mixed_latents_on_a_tiny_generator(synthetic32, tmp_path):
    torch.manual_seed(0)
    G = build_generator(tiny_config(resolution=32)).eval()
    ext = TinyExtractor()
    values = {}
    for name in ("fid50k", "fid50k_mix2", "fid50k_mix3", "fid50k_mix4"):
        r = calc_metric(name, _opts(G, synthetic32, tmp_path, ext, num=48))
        values[name] = r["results"][name]
        assert r["protocol"][f"protocol.{name}.reals"].startswith("48 ")
    assert all(np.isfinite(v) and v > 0 for v in values.values())
    assert len(set(values.values())) == 4  # mixing changes the images

    def rank_fn(rank, gather):
        o = _opts(G, synthetic32, tmp_path / f"w{rank}", ext, num=48, rank=rank, world_size=2, gather=gather)
        return calc_metric("fid50k_mix3", o)["results"]["fid50k_mix3"]

    assert run_ranks(2, rank_fn) == [pytest.approx(values["fid50k_mix3"], rel=1e-9)] * 2
