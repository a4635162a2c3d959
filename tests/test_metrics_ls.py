"""Linear separability: entropy math, the SVM step, attribute classifiers trained on the synthetic dataset,
and hand-made generators that encode a factor linearly or ignore it."""

import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.synthetic import BACKGROUNDS, COLORS
from stylegan_dist.metrics import MetricError, MetricOptions, calc_metric
from stylegan_dist.metrics.classifier import (
    AttributeClassifier,
    AttributeCNN,
    binary_attributes,
    load_classifier,
    save_classifier,
    train_classifier,
)
from stylegan_dist.metrics.separability import (
    conditional_entropy,
    ls_from_partials,
    ls_partial,
    separability_from_arrays,
)
from stylegan_dist.metrics.testing import make_synthetic_dataset, run_ranks

NAVY = torch.tensor(BACKGROUNDS["navy"], dtype=torch.float32)
MAROON = torch.tensor(BACKGROUNDS["maroon"], dtype=torch.float32)
OBJECT_COLORS = torch.tensor(list(COLORS.values()), dtype=torch.float32)


class ShapeGenerator(torch.nn.Module):
    """Images in the synthetic dataset's style: a disc of an object colour on a navy or maroon background.

    encode=True: background = navy when w[0] > 0 (a linear function of z and w); encode=False: the
    background follows the noise input, so no function of the latent predicts it. Object colour and
    position follow other latent coordinates in both."""

    def __init__(self, encode: bool, resolution: int = 16):
        super().__init__()
        self.encode, self.latent_dim, self.num_ws, self.max_resolution = encode, 8, 1, resolution
        object.__setattr__(self, "synthesis", self)  # not a submodule

    def map(self, z, *a, **kw):
        return z[:, None, :]

    def noise_shapes(self, resolution):
        return [(0, resolution)]

    def forward(self, ws, resolution, alpha=1.0, noise=None):
        w = ws[:, 0]
        n = w.shape[0]
        navy = (w[:, 0] > 0) if self.encode else (noise[0][:, 0, 0, 0] > 0)
        bg = torch.where(navy[:, None], NAVY, MAROON)  # [N, 3]
        fg = OBJECT_COLORS[((torch.tanh(w[:, 1]) + 1) * 3).long().clamp(0, 5)]
        c = torch.arange(resolution, dtype=torch.float32) + 0.5
        cx = (0.5 + 0.1 * torch.tanh(w[:, 2])) * resolution
        cy = (0.5 + 0.1 * torch.tanh(w[:, 3])) * resolution
        inside = ((c[None, None, :] - cx[:, None, None]) ** 2 + (c[None, :, None] - cy[:, None, None]) ** 2
                  <= (0.22 * resolution) ** 2).float()[:, None]  # [N, 1, R, R]
        img = bg.view(n, 3, 1, 1) * (1 - inside) + fg.view(n, 3, 1, 1) * inside
        return img / 127.5 - 1.0


class CornerOracle:
    """P(background = navy) from the corner pixel's colour (a perfect classifier for ShapeGenerator). Its
    confidence varies with the object's brightness, independently of the class, like a real classifier's."""

    attributes = ["background=navy"]
    val_accuracy = {"background=navy": 1.0}

    def __call__(self, images):
        px = (images[:, :, 0, 0].float() + 1) * 127.5
        centre = (images[:, :, images.shape[2] // 2, images.shape[3] // 2].float() + 1) * 127.5
        d_navy, d_maroon = (px - NAVY).norm(dim=1), (px - MAROON).norm(dim=1)
        return torch.sigmoid((d_maroon - d_navy) / 100.0 * (1 + centre.mean(dim=1) / 64))[:, None]


class Subset:
    """Only some attributes of a classifier."""

    def __init__(self, clf, names):
        self.clf, self.idx, self.attributes = clf, [clf.attributes.index(n) for n in names], list(names)
        self.val_accuracy = {n: clf.val_accuracy[n] for n in names}

    def __call__(self, images):
        return self.clf(images)[:, self.idx]


def ls_of(G, clf, num=400, **kw):
    opts = MetricOptions(G=G, resolution=16, batch_size=100, num=num, classifier=clf, **kw)
    return calc_metric("ls", opts)["results"]


# --------------------------------------------------------------------------------------------------
# Math


def official_conditional_entropy_bits(x, y):
    p = np.array([[np.mean((x == r) & (y == c)) for c in (0, 1)] for r in (0, 1)])
    px, py = p.sum(1), p.sum(0)
    h_y = -sum(v * math.log2(v) for v in py if v > 0)
    mi = sum(p[r, c] * math.log2(p[r, c] / (px[r] * py[c])) for r in (0, 1) for c in (0, 1) if p[r, c] > 0)
    return max(0.0, h_y - mi)


def test_conditional_entropy_matches_the_official_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.random(300) < rng.random()
        y = np.where(rng.random(300) < 0.8, x, rng.random(300) < 0.5)
        assert conditional_entropy(x, y) == pytest.approx(official_conditional_entropy_bits(x, y) * math.log(2))
    x = rng.random(1000) < 0.5
    assert conditional_entropy(x, x) == 0.0
    assert conditional_entropy(x, ~x) == 0.0  # a flipped predictor still determines Y
    y = rng.random(100_000) < 0.5
    assert conditional_entropy(rng.random(100_000) < 0.5, y) == pytest.approx(math.log(2), abs=1e-3)


def test_separable_attribute_scores_one_and_random_attribute_about_two():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2000, 8)).astype(np.float32)
    w = z @ rng.standard_normal((8, 8)).astype(np.float32)
    linear = 1 / (1 + np.exp(-5 * (z[:, 0] + 0.5 * z[:, 3])))
    noise = rng.random(2000)
    res = separability_from_arrays(z, w, np.stack([linear], 1), ["a"])
    assert res["ls_z"] == pytest.approx(1.0, abs=0.02) and res["ls_w"] == pytest.approx(1.0, abs=0.02)
    res = separability_from_arrays(z, w, np.stack([noise], 1), ["b"])
    assert 1.7 < res["ls_z"] <= 2.0 + 1e-9
    both = separability_from_arrays(z, w, np.stack([linear, noise], 1), ["a", "b"])
    assert both["ls_z"] == pytest.approx(np.exp(sum(h[0] for h in both["entropies"].values())))


def test_binary_attributes_from_factor_labels():
    specs = [{"name": "shape", "kind": "categorical", "num_classes": 3, "classes": ["circle", "square", "cross"]},
             {"name": "size", "kind": "continuous", "range": [0.1, 0.3]},
             {"name": "hue", "kind": "continuous"}]
    labels = {"shape": np.array([0, 2, 1, 2]), "size": np.array([0.15, 0.25, 0.2, 0.21]),
              "hue": np.array([1.0, 2.0, 3.0, 10.0])}
    names, y = binary_attributes(specs, labels)
    assert names == ["shape=circle", "shape=square", "shape=cross", "size>0.2", "hue>2.5"]
    np.testing.assert_array_equal(y[:, 2], [0, 1, 0, 1])
    np.testing.assert_array_equal(y[:, 3], [0, 1, 0, 1])
    np.testing.assert_array_equal(y[:, 4], [0, 0, 1, 1])


# --------------------------------------------------------------------------------------------------
# The metric with hand-made generators


def test_generator_encoding_a_factor_linearly_scores_better_than_one_ignoring_it():
    encode = ls_of(ShapeGenerator(True), CornerOracle())
    ignore = ls_of(ShapeGenerator(False), CornerOracle())
    assert encode["ls_z"] < 1.15 and encode["ls_w"] < 1.15
    assert ignore["ls_z"] > 1.5 and ignore["ls_w"] > 1.5


def test_ls_two_workers_equal_one():
    G, clf = ShapeGenerator(False), CornerOracle()
    single = ls_of(G, clf, num=300)

    def rank_fn(rank, gather):
        opts = MetricOptions(G=G, resolution=16, batch_size=100, num=300, classifier=clf, rank=rank, world_size=2,
                             gather=gather)
        return calc_metric("ls", opts)["results"]

    assert run_ranks(2, rank_fn) == [single, single]
    parts = [ls_partial(MetricOptions(G=G, resolution=16, batch_size=100, rank=r, world_size=2), clf, 300)
             for r in range(2)]
    assert ls_from_partials(parts[::-1], clf.attributes)["ls_z"] == single["ls_z"]


def test_min_accuracy_filter_and_errors():
    clf = CornerOracle()
    with pytest.raises(MetricError, match="held-out balanced accuracy"):
        ls_of(ShapeGenerator(True), clf, ls_min_accuracy=1.5)
    with pytest.raises(MetricError, match="at least 4"):
        ls_of(ShapeGenerator(True), clf, num=2)


@pytest.mark.slow
def test_trained_classifier_on_the_synthetic_dataset_orders_generators(tmp_path):
    data = make_synthetic_dataset(tmp_path / "shapes16", num_images=1024, resolution=16)
    clf = train_classifier(data, epochs=4, batch_size=64, lr=3e-3, log=None)  # ~2 s
    assert clf.resolution == 16 and "background=navy" in clf.attributes and len(clf.attributes) == 18
    assert clf.val_accuracy["background=navy"] > 0.9 and clf.val_accuracy["background=maroon"] > 0.9
    path = save_classifier(clf, tmp_path / "clf.pt")
    loaded = load_classifier(path)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), clf(x))
    assert loaded.val_accuracy == clf.val_accuracy

    sub = Subset(loaded, ["background=navy", "background=maroon"])
    encode = ls_of(ShapeGenerator(True), sub)
    ignore = ls_of(ShapeGenerator(False), sub)
    assert encode["ls_w"] < 1.3 and encode["ls_z"] < 1.3
    assert ignore["ls_w"] > 2.0 and ignore["ls_z"] > 2.0  # two attributes, ~1 bit each
    assert encode["ls_w"] < ignore["ls_w"] and encode["ls_z"] < ignore["ls_z"]


def test_classifier_checkpoint_and_export_formats(tmp_path):
    net = AttributeCNN(8, 3, channels=4)
    clf = AttributeClassifier(net, ["a", "b", "c"], 8, {"a": 0.9, "b": 0.8, "c": 0.7})
    loaded = load_classifier(save_classifier(clf, tmp_path / "c.pt"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # larger images are box-downsampled to the classifier's size
    torch.testing.assert_close(loaded(x), clf(x))
    assert loaded(x).shape == (2, 3)

    ep = torch.export.export(net.eval(), (torch.rand(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "e.pt2",
                      extra_files={"meta.json": json.dumps({"attributes": ["a", "b", "c"], "resolution": 8})})
    ex = load_classifier(tmp_path / "e.pt2")
    assert ex.attributes == ["a", "b", "c"] and ex.resolution == 8
    torch.testing.assert_close(ex(x), clf(x))

    torch.export.save(ep, tmp_path / "bare.pt2")
    with pytest.raises(MetricError, match="meta.json"):
        load_classifier(tmp_path / "bare.pt2")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(MetricError, match="neither"):
        load_classifier(tmp_path / "junk.pt")
