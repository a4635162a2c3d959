"""What the MLflow UI reads: grouped metric keys, the experiment kind, time-stepped images, system metrics of a node,
and G_ema in the Model Registry (new versions at the end and at each new best FID, alias ``best``)."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from stylegan_dist import tracking
from stylegan_dist.networks import build_generator


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_metric_keys_are_grouped_and_read_back():
    key = tracking.metric_key
    assert [key(k) for k in ("kimg", "lod", "img_per_sec", "peak_mem_gb", "fid50k", "time_fid50k", "eval_seconds",
                             "loss/G", "skipped_steps/D")] == [
        "progress/kimg", "progress/lod", "speed/img_per_sec", "memory/peak_gb", "metrics/fid50k", "time/fid50k",
        "time/eval_seconds", "loss/G", "skipped_steps/D"]
    for name in ("kimg", "fid50k", "time_fid50k", "eval_seconds", "loss/G", "peak_mem_gb", "ppl_wend"):
        assert tracking.stat_name(key(name)) == name
    # runs logged before the grouping (flat keys) read as the same statistics
    assert [tracking.stat_name(k) for k in ("loss_G", "scores_real", "kimg", "fid50k")] == [
        "loss/G", "scores/real", "kimg", "fid50k"]


def test_experiments_are_model_training_experiments(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    old = client.create_experiment("made-by-hand")  # e.g. by an older version, untagged
    assert tracking.ensure_experiment(store, "made-by-hand") == old
    new = tracking.ensure_experiment(store, "fresh")
    for exp_id in (old, new):
        assert client.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_run_logger_groups_keys_and_logs_stepped_images(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from stylegan_dist.images import save_png
    from stylegan_dist.tracking import image_steps

    run = tracking.create_run(store, "e", "r", {})
    log = tracking.RunLogger(store, run)
    log.log_metrics({"kimg": 0.5, "cur_nimg": 500, "loss/G": 1.5, "fid50k": 9.0, "flag": True}, step=500)
    grid = save_png(np.zeros((8, 8, 3), np.uint8), str(tmp_path / "g.png"))
    log.log_image(grid, key="samples", step=500)
    log.log_image(np.full((8, 8, 3), 255, np.uint8), key="samples", step=1000)
    client = MlflowClient(store)
    assert set(client.get_run(run).data.metrics) == {"progress/kimg", "loss/G", "metrics/fid50k"}
    assert image_steps(client, run, "samples") == [500, 1000]


def test_system_metrics_of_a_node_at_the_given_steps(store):
    from mlflow.tracking import MlflowClient

    from stylegan_dist.sysmetrics import NodeSystemMetrics

    run = tracking.create_run(store, "e", "r", {})
    sysm = NodeSystemMetrics(store, run, "node_3", interval=0.05)
    try:
        first = sysm.flush(100)
        second = sysm.flush(200)
    finally:
        sysm.close()
    assert "system/node_3/cpu_utilization_percentage" in first and set(first) == set(second)
    hist = MlflowClient(store).get_metric_history(run, "system/node_3/system_memory_usage_megabytes")
    assert [m.step for m in hist] == [100, 200] and all(m.value > 0 for m in hist)


def test_generator_registered_at_the_end_and_at_each_new_best_fid(store):
    from mlflow.tracking import MlflowClient

    from stylegan_dist.generate import load_generator
    from stylegan_dist.run_tracking import RunTracker

    cfg = tiny_config("metrics.names=fid50k", "tracking.system_metrics_sec=0", resolution=16)
    G = build_generator(cfg)
    run = tracking.create_run(store, "e", "r", {})
    tracker = RunTracker(store, run, cfg, "gen", log=None)
    for nimg, fid, done in ((100, 50.0, False), (200, 60.0, False), (300, 40.0, False), (400, None, False),
                            (500, 45.0, True)):
        stats = {"cur_nimg": nimg, **({"fid50k": fid} if fid is not None else {})}
        tracker.generator(G, stats, done)
    client = MlflowClient(store)
    versions = sorted(client.search_model_versions("name='gen'"), key=lambda v: int(v.version))
    # 100 (first FID), 300 (better), 500 (the end; worse than 300: no alias)
    assert [v.tags["kimg"] for v in versions] == ["0.1", "0.3", "0.5"]
    assert str(client.get_model_version_by_alias("gen", "best").version) == "2"
    assert client.get_run(run).data.tags["model.uri"] == "models:/gen/3"
    assert client.get_run(run).data.tags["model.best_uri"] == "models:/gen/2"
    # a second run under the same name moves "best" only when it beats the value held there
    other = RunTracker(store, tracking.create_run(store, "e", "r2", {}), cfg, "gen", log=None)
    other.generator(G, {"cur_nimg": 100, "fid50k": 41.0}, False)
    assert str(client.get_model_version_by_alias("gen", "best").version) == "2"
    # what the commands load: the generator, its config, the run it came from
    G2, cfg2, info = load_generator("models:/gen@best", tracking_uri=store)
    assert cfg2 == cfg and info["cur_nimg"] == 300 and info["extra"]["mlflow_run_id"] == run
    for a, b in zip(G.state_dict().values(), G2.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_model_is_one_sentence(store):
    from stylegan_dist.generate import load_generator
    from stylegan_dist.mlflow_model import ModelError

    tracking.ensure_experiment(store, "e")
    with pytest.raises(ModelError) as e:
        load_generator("models:/nothing/1", tracking_uri=store)
    assert str(e.value).count(".") >= 1 and "\n" not in str(e.value) and "models:/nothing/1" in str(e.value)


def test_bad_model_name_in_config_is_refused():
    from stylegan_dist.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.model_name"):
        tiny_config("tracking.model_name=my model")
