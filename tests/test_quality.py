"""Proof that the model learns: the shapes-FID (FID in the feature space of the project's own shapes classifier,
no downloaded weights) logged during a short training run on the synthetic shapes dataset falls."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stylegan_dist.data import TensorSource
from stylegan_dist.loop import training_loop
from stylegan_dist.metrics import MetricError, MetricOptions, calc_metric
from stylegan_dist.metrics.classifier import save_classifier, train_classifier
from stylegan_dist.metrics.testing import make_synthetic_dataset
from stylegan_dist.networks import build_generator


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    data = make_synthetic_dataset(d / "shapes16", num_images=256, resolution=16)
    clf = train_classifier(data, epochs=2, batch_size=64, channels=8, log=None)
    return {"data": data, "classifier": save_classifier(clf, d / "clf.pt"), "clf": clf}


def test_fid_shapes_is_zero_for_the_reals_and_positive_for_a_random_generator(shapes, tmp_path):
    from data_pipeline.stream import iter_images
    from stylegan_dist.metrics.classifier import ClassifierFeatures
    from stylegan_dist.metrics.fid import real_stats

    feats = ClassifierFeatures(shapes["clf"])
    images = torch.cat(list(iter_images(shapes["data"], 16, 64)))
    assert feats(images[:5]).shape == (5, feats.feature_dim) and feats.feature_dim == 128
    opts = MetricOptions(G=build_generator(tiny_config(resolution=16)).eval(), data=shapes["data"], num=256,
                         classifier=shapes["clf"], cache_dir=str(tmp_path), batch_size=64)
    mu, sigma, n = real_stats(opts, feats, 256)
    from stylegan_dist.metrics.frechet import FeatureStats, frechet_distance

    s = FeatureStats(feats.feature_dim)
    s.append(feats(images))
    assert n == 256 and frechet_distance(mu, sigma, *s.mean_cov()) < 1e-6
    assert calc_metric("fid_shapes", opts)["results"]["fid_shapes"] > 0


def test_fid_shapes_needs_a_classifier_of_this_module(shapes, tmp_path):
    from stylegan_dist.metrics.classifier import AttributeClassifier

    clf = AttributeClassifier(torch.nn.Linear(3, 1), ["a"], 16)  # not an AttributeCNN: no feature layer
    opts = MetricOptions(G=build_generator(tiny_config(resolution=16)).eval(), data=shapes["data"], num=8,
                         classifier=clf, cache_dir=str(tmp_path))
    with pytest.raises(MetricError, match="^fid_shapes needs an attribute classifier trained by"):
        calc_metric("fid_shapes", opts)


@pytest.mark.slow
def test_shapes_fid_of_a_short_demo_run_falls(shapes, tmp_path):
    from data_pipeline.stream import iter_images

    images = torch.cat(list(iter_images(shapes["data"], 16, 256)))
    cfg = tiny_config(
        "schedule.start_resolution=16", "schedule.total_kimg=0.32", "schedule.batch_per_gpu={}",
        "schedule.batch_base=16", "schedule.tick_kimg_dict={}", "schedule.tick_kimg_base=0.16",
        "schedule.lr_base=0.002", "optim.ema_halflife_kimg=0.05", "train.checkpoint_kimg=100", "train.grid_size=4",
        "metrics.names=fid_shapes", "metrics.kimg=0.001", "metrics.num=128", "metrics.batch_size=64",
        f"metrics.classifier={shapes['classifier']}", f"metrics.cache_dir={tmp_path / 'cache'}", resolution=16)
    res = training_loop(cfg, TensorSource(images), tmp_path / "run", log=None, metrics_data=shapes["data"])
    curve = [h["fid_shapes"] for h in res.history]
    assert len(curve) == 2 and all(np.isfinite(curve))
    assert curve[-1] < curve[0], curve  # the model learns: the last tick is closer to the data
