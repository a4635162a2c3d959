"""Sweep files: the shipped ones load at the paper's scale and match the paper's tables; bad files give one
clear sentence naming the line; trial identity and config precedence (no Ray here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from stylegan_dist.compare import PAPER_TABLES
from stylegan_dist.config import TABLE1_PRESETS, build_config, flat_params, to_dict
from stylegan_dist.sweep_schema import SweepError, TrialPoint, load_sweep

SWEEPS = ROOT / "sweeps"
PAPER_SCALE = ["table1_configs", "table2_mixing", "table3_path_length", "table4_mapping_depth", "noise_ablation"]
EIGHT_GPU_BATCH = {4: 64, 8: 32, 16: 16, 32: 8, 64: 4, 128: 4, 256: 4, 512: 4, 1024: 4}
FID_DURING = ["metrics.names=fid50k", "metrics.kimg=1000"]


def _configs(spec):
    return {spec.label(p): spec.trial_config(p) for p in spec.grid_points()}


def test_every_shipped_sweep_loads_and_smoke_is_small():
    names = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    assert set(PAPER_SCALE + ["smoke"]) <= set(names)
    for name in names:
        spec = load_sweep(SWEEPS / f"{name}.yaml")
        assert spec.name == name
        assert spec.data is None, "shipped sweeps take the dataset from --data, never a stand-in path"
        assert spec.num_trials() == len(spec.grid_points()) >= 2
    smoke = load_sweep(SWEEPS / "smoke.yaml")
    assert smoke.num_trials() == 2 and smoke.resources.gpu is False and smoke.evaluate.metrics == ()
    for cfg in _configs(smoke).values():
        assert cfg.model.resolution == 16 and cfg.schedule.total_kimg < 1


@pytest.mark.parametrize("name", PAPER_SCALE)
def test_paper_scale_defaults(name):
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    assert spec.resources.workers == 8 and spec.resources.gpu is True
    assert spec.evaluate.num is None and "fid50k" in spec.evaluate.metrics  # the paper's sample counts
    assert spec.paper_table in PAPER_TABLES and spec.scheduler is None
    for label, cfg in _configs(spec).items():
        assert cfg.model.resolution == 1024 and cfg.schedule.total_kimg == 25000, label
        assert cfg.schedule.batch_per_gpu == EIGHT_GPU_BATCH, label  # x 8 workers = the official 8-GPU totals
        assert cfg.schedule.stabilise_kimg == cfg.schedule.fade_kimg == 600, label
        assert cfg.metrics.names == "fid50k" and cfg.metrics.kimg == 1000 and cfg.metrics.num == 0, label


@pytest.mark.parametrize("name", PAPER_SCALE + ["smoke"])
def test_every_trial_maps_to_its_paper_row(name):
    """The comparison puts the paper's values beside each trial: the sweep's trials and the paper table's
    rows must agree (every paper row is run, every trial finds its row, except one noise control)."""
    spec = load_sweep(SWEEPS / f"{name}.yaml")
    table = PAPER_TABLES[spec.paper_table]
    rows = []
    for p in spec.grid_points():
        cfg = spec.trial_config(p)
        preset, _ = spec.trial_overrides(p)
        tags = {"sweep.variant": p.variant or "", "sweep.preset": preset or "", "sweep.paper_row": ""}
        rows.append(table.row_key(flat_params(cfg), {k: v for k, v in tags.items() if v}))
    assert len(set(rows)) == len(rows), rows
    assert set(rows) <= set(table.rows), rows
    if name != "smoke":
        assert set(rows) == set(table.rows), rows


def test_table1_trials_are_the_config_presets():
    spec = load_sweep(SWEEPS / "table1_configs.yaml")
    configs = _configs(spec)
    assert sorted(configs) == sorted(TABLE1_PRESETS)
    for preset, cfg in configs.items():
        ref = build_config(preset=preset, set_args=[f"schedule.batch_per_gpu={EIGHT_GPU_BATCH}", *FID_DURING])
        assert cfg == ref, preset


def test_table2_and_table4_trials():
    mix = {round(c.generator.mixing_prob, 3) for c in _configs(load_sweep(SWEEPS / "table2_mixing.yaml")).values()}
    assert mix == {0.0, 0.5, 0.9, 1.0}
    t4 = _configs(load_sweep(SWEEPS / "table4_mapping_depth.yaml"))
    got = {(c.generator.architecture, c.generator.mapping_layers) for c in t4.values()}
    assert got == {("traditional", 0), ("traditional", 8), ("style", 0), ("style", 1), ("style", 2), ("style", 8)}
    assert t4["style-8"] == build_config(set_args=[f"schedule.batch_per_gpu={EIGHT_GPU_BATCH}", *FID_DURING])  # F
    assert not t4["traditional-8"].generator.use_styles and t4["style-1"].generator.use_noise


def test_trial_keys_are_deterministic_and_distinct():
    a, b = load_sweep(SWEEPS / "noise_ablation.yaml"), load_sweep(SWEEPS / "noise_ablation.yaml")
    keys = [a.trial_key(p) for p in a.grid_points()]
    assert keys == [b.trial_key(p) for p in b.grid_points()]
    assert len(set(keys)) == 4 and all("/" not in k for k in keys)
    repeated = load_sweep(SWEEPS / "smoke.yaml", ["num_samples=2"])
    assert repeated.num_trials() == 4 and len({repeated.trial_key(p) for p in repeated.grid_points()}) == 4


GOOD = "name: t\nsearch:\n  generator.mixing_prob: [0.0, 0.9]\n"


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, expected", [
    ("name: t\nserach:\n  generator.mixing_prob: [0, 1]\n",
     "line 2: unknown sweep key 'serach' (did you mean 'search'?)"),
    ("name: t\nsearch:\n  generator.mixing_prb: [0, 1]\n",
     "line 3: unknown search key 'generator.mixing_prb' (did you mean 'generator.mixing_prob'?)"),
    ("name: t\nbase:\n  overrides:\n    generator:\n      mapping_layerz: 3\n" + GOOD[8:],
     "line 5: unknown config key 'generator.mapping_layerz' (did you mean 'generator.mapping_layers'?)"),
    ("name: t\nsearch:\n  generator.mixing_prob: [0, high]\n",
     "line 3: config key 'generator.mixing_prob' expects a number, got 'high'"),
    ("name: t\nsearch:\n  generator.mapping_layers: {uniform: [0, 8]}\n",
     "line 3: config key 'generator.mapping_layers' expects an integer"),
    ("name: t\nsearch:\n  generator.mixing_prob: [0.0]\nresources:\n  workers: two\n",
     "line 5: 'workers' expects an integer, got 'two'"),
    ("name: t\nsearch:\n  generator.mixing_prob: []\n",
     "line 3: search key 'generator.mixing_prob' has an empty grid"),
    ("name: t\nsearch: {}\n", "line 2: the search space is empty"),
    ("name: t\ntrials: []\n", "line 2: 'trials' is empty"),
    ("name: t\n", "the sweep defines no trials"),
    ("name: t\nsearch:\n  generator.mixing_prob: [0, 1\nresources: {workers: 1}\n",
     "not valid YAML (expected ',' or ']', but got ':'; while parsing a flow sequence at line 3)"),
    ("- a\n- b\n", "a sweep file must be a mapping"),
    ("name: t\nsearch:\n  generator.mixing_prob: 0.5\n", "line 3: search key 'generator.mixing_prob' has the single "
     "value 0.5"),
    ("name: t\nsearch:\n  generator.mixing_prob: [0.5]\n  generator.architecture: [traditional]\n",
     "line 2: trial 'mixing_prob=0.5,architecture=traditional' has an invalid config: generator.mixing_prob > 0 "
     "needs generator.use_styles"),
    ("name: t\nsearch:\n  preset: [A, G]\n", "line 3: unknown preset 'G'"),
    (GOOD + "evaluate: {metrics: [fid]}\n", "line 4: unknown metric 'fid' (did you mean 'fid50k'?)"),
    (GOOD + "paper_table: table9\n", "line 4: unknown paper table 'table9' (did you mean 'table"),
    (GOOD + "resources: {gpu: maybe}\n", "line 4: 'gpu' expects true, false or auto"),
    (GOOD + "scheduler: {type: asha}\n", "line 4: the scheduler needs a metric"),
    ("name: t\ntrials:\n  - {name: a}\n  - {name: a}\n", "line 4: the trial name 'a' is used twice"),
    ("name: bad/name\n" + GOOD[8:], "line 1: the sweep name 'bad/name' must be a plain directory name"),
])
def test_bad_sweep_files_one_sentence_with_line(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and expected in msg, msg
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg


@pytest.mark.parametrize("args, expected", [
    (["resources.wrkers=2"], "--set resources.wrkers: unknown resources key 'wrkers' (did you mean 'workers'?)"),
    (["generator.mixing_prb=0.5"], "not a sweep key nor a config key (did you mean 'generator.mixing_prob'?)"),
    (["generator.mixing_prob=lots"], "expects a number, got 'lots'"),
    (["search.generator.mixing_prob=[]"], "--set search.generator.mixing_prob=[]: search key "
     "'generator.mixing_prob' has an empty grid"),
    (["resources.workers=0"], "--set resources.workers=0: 'workers' must be at least 1"),
])
def test_bad_set_arguments(args, expected):
    with pytest.raises(SweepError) as e:
        load_sweep(SWEEPS / "smoke.yaml", args)
    assert expected in str(e.value), str(e.value)


def test_precedence_and_set_arguments(tmp_path):
    base_cfg = _write(tmp_path, "generator: {mapping_layers: 4}\ntrain: {seed: 7}\n", "base.yaml")
    path = _write(tmp_path, f"""
name: prec
base:
  preset: C
  config: {base_cfg.name}
  overrides: {{generator.mapping_layers: 5, schedule.total_kimg: 100}}
trials:
  - {{name: plain}}
  - {{name: own, preset: F, overrides: {{generator.mapping_layers: 6}}}}
search:
  schedule.lr_base: [0.002]
""")
    spec = load_sweep(path, ["schedule.total_kimg=50", "train.seed=3", "resources.workers=2", "evaluate.num=99"])
    plain = spec.trial_config(TrialPoint("plain", {"schedule.lr_base": 0.002}))
    own = spec.trial_config(TrialPoint("own", {"schedule.lr_base": 0.002}))
    assert not plain.generator.use_noise and own.generator.use_noise  # base preset C vs the trial's preset F
    assert plain.generator.mapping_layers == 5 and own.generator.mapping_layers == 6
    assert plain.schedule.total_kimg == 50 and plain.train.seed == 3  # --set beats the file's base
    assert plain.schedule.lr_base == own.schedule.lr_base == 0.002  # search values beat everything
    assert spec.resources.workers == 2 and spec.evaluate.num == 99
    assert spec.num_trials() == 2 and spec.label(TrialPoint("own", {"schedule.lr_base": 0.002})) == "own,lr_base=0.002"


def test_scheduler_needs_the_metric_during_training(tmp_path):
    text = "name: t\nsearch:\n  generator.mixing_prob: [0.0, 0.9]\nscheduler: {type: asha, metric: fid50k}\n"
    with pytest.raises(SweepError, match="line 4: the scheduler acts on 'fid50k' while trials train"):
        load_sweep(_write(tmp_path, text))
    ok = load_sweep(_write(tmp_path, text + "base:\n  overrides: {metrics.names: fid50k, metrics.kimg: 1000}\n"))
    assert ok.scheduler.metric == "fid50k" and ok.scheduler.time_attr == "kimg" and ok.training_metrics() == {"fid50k"}
    assert load_sweep(_write(tmp_path, text.replace("fid50k", "loss_G"))).scheduler.metric == "loss_G"


def test_sampled_space(tmp_path):
    path = _write(tmp_path, "name: s\nsearch:\n  schedule.lr_base: {loguniform: [0.0005, 0.003]}\n"
                  "  generator.mapping_layers: [1, 2]\nnum_samples: 3\n")
    spec = load_sweep(path)
    assert spec.sampled and spec.num_trials() == 6
    p = TrialPoint(None, {"schedule.lr_base": 0.001, "generator.mapping_layers": 2})
    assert spec.trial_key(p, "a") != spec.trial_key(p, "b")  # two samples may coincide: the trial id separates
    assert spec.trial_config(p).schedule.lr_base == 0.001


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "stylegan_dist.sweep", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)


def test_cli_dry_run_and_errors(tmp_path):
    r = _cli("sweeps/table4_mapping_depth.yaml", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "6 trials" in r.stdout and "traditional-8  -> trials/traditional-8-" in r.stdout
    assert "schedule.batch_per_gpu = {4: 64, 8: 32" in r.stdout  # shared by every trial, listed once
    # no dataset: one sentence, nothing written, no Ray started
    r = _cli("sweeps/smoke.yaml", "--storage", tmp_path / "runs")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: No dataset: pass --data DIR") and not (tmp_path / "runs").exists()
    r = _cli("sweeps/smoke.yaml", "--data", tmp_path / "nothing", "--storage", tmp_path / "runs")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = _write(tmp_path, "name: t\nsearch:\n  generator.mixing_prob: [0, 1\n")
    r = _cli(bad, "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {bad} line") and "Traceback" not in r.stderr


def test_fingerprint_changes_with_trials_not_resources():
    a = load_sweep(SWEEPS / "smoke.yaml")
    b = load_sweep(SWEEPS / "smoke.yaml", ["resources.workers=2", "max_concurrent_trials=2"])
    c = load_sweep(SWEEPS / "smoke.yaml", ["schedule.total_kimg=0.32"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert to_dict(a.trial_config(a.grid_points()[0]))["generator"]["mixing_prob"] == 0.0


def test_asha_scheduler_is_built_from_the_file(tmp_path, monkeypatch):
    from stylegan_dist.sweep import _make_scheduler

    monkeypatch.delenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", raising=False)
    path = _write(tmp_path, "name: t\nsearch:\n  generator.mixing_prob: [0.0, 0.9]\nobjective: {metric: fid50k}\n"
                  "scheduler: {type: asha, grace_period: 600, reduction_factor: 3}\n"
                  "base:\n  overrides: {metrics.names: fid50k, metrics.kimg: 600}\n")
    spec = load_sweep(path)
    sched = _make_scheduler(spec, 25000.0)
    assert type(sched).__name__ == "AsyncHyperBandScheduler" and sched.metric == "fid50k"
    assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "1"  # ticks without FID must not fail the trial
    assert _make_scheduler(load_sweep(SWEEPS / "smoke.yaml"), 1.0) is None


def test_weights_checked_are_those_the_metrics_load(tmp_path, monkeypatch):
    """fid_shapes and ls read the shapes classifier only; fid50k the Inception file: each missing one is named."""
    from stylegan_dist.sweep import resolve_weights

    monkeypatch.setenv("STYLEGAN_WEIGHTS_DIR", str(tmp_path / "none"))
    clf = tmp_path / "clf.pt"
    clf.write_bytes(b"x")
    spec = load_sweep(SWEEPS / "smoke.yaml", ["evaluate.metrics=[fid_shapes, ls]",
                                             f"evaluate.weights={{classifier: {clf}}}"])
    assert resolve_weights(spec) == {"classifier": str(clf)}
    spec = load_sweep(SWEEPS / "smoke.yaml", ["evaluate.metrics=[fid50k]", f"evaluate.weights={{classifier: {clf}}}"])
    with pytest.raises(SweepError, match="Inception"):
        resolve_weights(spec)
