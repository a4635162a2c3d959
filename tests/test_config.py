from pathlib import Path

import pytest

from stylegan_dist.config import (
    Config,
    ConfigError,
    build_config,
    flat_params,
    from_dict,
    to_dict,
)


def test_defaults_are_paper_ffhq():
    cfg = build_config()
    assert cfg.model.resolution == 1024 and cfg.model.fmap_base == 8192 and cfg.model.fmap_max == 512
    g = cfg.generator
    assert (g.mapping_layers, g.mapping_lrmul, g.mixing_prob, g.w_avg_beta) == (8, 0.01, 0.9, 0.995)
    assert g.use_styles and g.const_input and g.use_noise and g.use_instance_norm and not g.use_pixel_norm
    assert cfg.loss.kind == "logistic_r1" and cfg.loss.r1_gamma == 10.0
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.0, 0.99, 1e-8)
    assert cfg.schedule.total_kimg == 25000 and cfg.schedule.start_resolution == 8


def test_traditional_fills_its_own_defaults_but_keeps_explicit_ones():
    cfg = build_config(set_args=["generator.architecture=traditional", "generator.mapping_layers=8"])
    g = cfg.generator
    assert g.mapping_layers == 8 and not g.use_styles and not g.const_input and g.use_pixel_norm
    assert g.mixing_prob == 0.0


def test_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError, match=r"Unknown config key 'generator.mixing_probability'.*generator.mixing_prob"):
        build_config(set_args=["generator.mixing_probability=0.5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'schedule.total_kimg' expects a number"):
        build_config(set_args=["schedule.total_kimg=lots"])
    with pytest.raises(ConfigError, match="'generator.use_noise' expects true or false"):
        build_config(set_args=["generator.use_noise=3"])


def test_yaml_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  resolution: 64\ngenerator:\n  mapping_layers: 2\nschedule:\n  lr_dict: {64: 0.01}\n")
    cfg = build_config(f, ["generator.mapping_layers=1"])
    assert cfg.model.resolution == 64 and cfg.generator.mapping_layers == 1
    assert cfg.schedule.lr_dict == {64: 0.01}


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  resolution: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        build_config(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("modle:\n  resolution: 64\n")
    with pytest.raises(ConfigError, match="Unknown config key"):
        build_config(unk)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")


def test_inconsistent_switches_are_errors():
    with pytest.raises(ConfigError, match="mixing_prob > 0 needs generator.use_styles"):
        build_config(set_args=["generator.use_styles=false", "generator.const_input=false"])
    with pytest.raises(ConfigError, match="power of two"):
        build_config(set_args=["model.resolution=100"])
    with pytest.raises(ConfigError, match="schedule.d_lr_mult must be > 0, got 0"):
        build_config(set_args=["schedule.d_lr_mult=0"])


def test_presets_table1():
    a = build_config(preset="A")
    assert a.generator.architecture == "traditional" and not a.model.blur
    c = build_config(preset="C")
    assert c.generator.use_styles and not c.generator.const_input and not c.generator.use_noise
    e = build_config(preset="E")
    assert e.generator.use_noise and e.generator.mixing_prob == 0.0
    assert build_config(preset="F") == build_config()


def test_round_trip_and_params():
    cfg = build_config(set_args=["generator.mapping_layers=2"])
    assert from_dict(to_dict(cfg)) == cfg
    assert flat_params(cfg)["generator.mapping_layers"] == "2"
    assert isinstance(Config(), Config)


def test_every_shipped_config_builds():
    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for p in paths:
        build_config(p)
