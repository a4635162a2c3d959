"""The sweep file: a YAML description of a set of training runs (trials) and how to compare them.

A sweep file (see sweeps/README.md for the full reference) looks like::

    name: table2_mixing            # sweep directory and MLflow experiment (default: the file's stem)
    paper_table: table2            # put the paper's published values beside ours in the comparison
    base:                          # the config every trial starts from
      preset: F                    # optional paper Table 1 configuration A-F
      config: bases/ffhq.yaml      # optional config YAML, relative to the sweep file
      overrides: {schedule.total_kimg: 25000}
    search:                        # grid or sampled search space over any config key (or 'preset')
      generator.mixing_prob: [0.0, 0.5, 0.9, 1.0]          # a list is a grid
      # generator.mapping_layers: {choice: [1, 2, 8]}      # grid | choice | uniform | loguniform | randint
    trials:                        # optional named variants, crossed with the search space
      - {name: style-8, overrides: {generator.mapping_layers: 8}}
    num_samples: 1                 # repeats of the grid, or samples of a sampled space
    resources: {workers: 8, gpu: auto, cpus_per_worker: 8}
    max_concurrent_trials: null    # null: as many as the cluster holds
    evaluate: {metrics: [fid50k], num: null}
    objective: {metric: fid50k, mode: min}
    scheduler: null                # or {type: asha, grace_period: 1200, reduction_factor: 2}
    retries: 1                     # Tune re-runs a failed trial this often (it resumes from its checkpoints)
    max_failures: 3                # worker failures tolerated inside one trial's Ray Train run

Every error is one sentence that names the file and line (or the ``--set`` argument) and what to do.
The config precedence for one trial is: defaults < preset (the trial's, else the base's) < base.config <
base.overrides < config keys given with ``--set`` < the trial's overrides < its search values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import TABLE1_PRESETS, Config, ConfigError, all_keys, apply_overrides, load_yaml, resolve


class SweepError(ValueError):
    """A malformed sweep file or argument; the message is one sentence."""


TOP_KEYS = ("name", "description", "paper_table", "data", "storage", "base", "search", "trials", "num_samples",
            "seed", "resources", "max_concurrent_trials", "evaluate", "objective", "scheduler", "retries",
            "max_failures", "keep_checkpoints")
BASE_KEYS = ("preset", "config", "overrides")
TRIAL_KEYS = ("name", "preset", "overrides", "paper_row")
RESOURCE_KEYS = ("workers", "gpu", "cpus_per_worker")
EVALUATE_KEYS = ("metrics", "num", "batch", "seed", "weights", "ppl_crop", "cache_dir")
WEIGHT_KEYS = ("inception", "vgg16", "lpips", "classifier")
OBJECTIVE_KEYS = ("metric", "mode")
SCHEDULER_KEYS = ("type", "metric", "mode", "time_attr", "grace_period", "reduction_factor", "max_t")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SAMPLED = ("choice", "uniform", "loguniform", "randint")
METRIC_NAMES = ("fid50k", "fid50k_mix2", "fid50k_mix3", "fid50k_mix4", "ppl_zfull", "ppl_wfull", "ppl_zend",
                "ppl_wend", "ls", "fid_shapes")
# Which values each evaluation metric reports (ls reports both spaces).
METRIC_OUTPUTS = {"ls": ("ls_z", "ls_w")}
SCHEDULERS = ("asha",)
PRESET_KEY = "preset"  # a search dimension over the paper's Table 1 configurations


# --------------------------------------------------------------------------------------------------
# The parsed sweep


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    paper_row: str | None = None


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key, or 'preset'
    kind: str  # one of DOMAINS
    values: tuple  # grid/choice: the values; uniform/loguniform/randint: (low, high)

    @property
    def sampled(self) -> bool:
        return self.kind in SAMPLED

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]

    def describe(self) -> str:
        if self.kind == "grid":
            return f"{self.key} in {list(self.values)}"
        if self.kind == "choice":
            return f"{self.key} ~ choice{list(self.values)}"
        return f"{self.key} ~ {self.kind}({self.values[0]}, {self.values[1]})"


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    gpu: bool | str = "auto"  # True, False or "auto" (GPUs when the cluster has any)
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class Evaluate:
    metrics: tuple[str, ...] = ()
    num: int | None = None  # None: the paper's sample counts
    batch: int = 32
    seed: int = 0
    weights: dict[str, str] = field(default_factory=dict)
    ppl_crop: bool = True  # StyleGAN v1's central face crop before LPIPS (false for data that are not faces)
    cache_dir: str | None = None  # FID real-statistics cache (None: $STYLEGAN_CACHE_DIR or ~/.cache/stylegan_dist)

    def outputs(self) -> list[str]:
        return [o for m in self.metrics for o in METRIC_OUTPUTS.get(m, (m,))]


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    metric: str = ""
    mode: str = "min"
    time_attr: str = "kimg"
    grace_period: float = 1200.0
    reduction_factor: float = 2.0
    max_t: float | None = None  # None: the base config's total_kimg


@dataclass(frozen=True)
class TrialPoint:
    """One trial: a variant (or none), a value per search dimension, and a repeat index."""

    variant: str | None
    values: dict[str, Any]
    repeat: int = 0


@dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    description: str = ""
    paper_table: str | None = None
    data: str | None = None
    storage: str | None = None  # None: $STYLEGAN_DIST_STORAGE, else ./runs
    base_preset: str | None = None
    base_config: str | None = None  # absolute path
    base_overrides: dict[str, Any] = field(default_factory=dict)
    set_overrides: dict[str, Any] = field(default_factory=dict)  # config keys from --set
    search: tuple[Dimension, ...] = ()
    variants: tuple[Variant, ...] = ()
    num_samples: int = 1
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int | None = None
    evaluate: Evaluate = field(default_factory=Evaluate)
    objective_metric: str | None = None
    objective_mode: str = "min"
    scheduler: Scheduler | None = None
    retries: int = 1
    max_failures: int = 3
    keep_checkpoints: int | None = None

    # ---- trials ----------------------------------------------------------------------------------

    @property
    def sampled(self) -> bool:
        return any(d.sampled for d in self.search)

    def variant(self, name: str | None) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def grid_points(self) -> list[TrialPoint]:
        """Every trial of a grid-only sweep, in order (variants outermost, then the search keys, then repeats).
        For sampled dimensions this lists one point per grid combination with the sampled value left as None."""
        combos: list[dict[str, Any]] = [{}]
        for d in self.search:
            vals = d.values if not d.sampled else (None,)
            combos = [{**c, d.key: v} for c in combos for v in vals]
        names = [v.name for v in self.variants] or [None]
        repeats = range(self.num_samples) if not self.sampled else range(1)
        return [TrialPoint(n, c, r) for n in names for c in combos for r in repeats]

    def num_trials(self) -> int:
        grid = len(self.grid_points())
        return grid * self.num_samples if self.sampled else grid

    def trial_overrides(self, point: TrialPoint) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
        """(preset, [(where, overrides), ...]) in precedence order for one trial."""
        v = self.variant(point.variant)
        preset = point.values.get(PRESET_KEY) or (v.preset if v else None) or self.base_preset
        layers: list[tuple[str, dict[str, Any]]] = []
        if self.base_config:
            layers.append((self.base_config, load_yaml(self.base_config)))
        layers.append((f"{self.path} base.overrides", self.base_overrides))
        layers.append(("--set", self.set_overrides))
        if v is not None:
            layers.append((f"{self.path} trial '{v.name}'", v.overrides))
        values = {k: val for k, val in point.values.items() if k != PRESET_KEY and val is not None}
        layers.append((f"{self.path} search", values))
        return preset, layers

    def trial_config(self, point: TrialPoint) -> Config:
        preset, layers = self.trial_overrides(point)
        cfg = Config()
        if preset is not None:
            cfg = apply_overrides(cfg, TABLE1_PRESETS[preset], f"preset {preset}")
        for where, overrides in layers:
            cfg = apply_overrides(cfg, overrides, where)
        return resolve(cfg)

    def label(self, point: TrialPoint) -> str:
        parts = [point.variant] if point.variant else []
        for d in self.search:
            val = point.values.get(d.key)
            if d.key == PRESET_KEY:
                parts.append(str(val))
            else:
                parts.append(f"{d.short}={_fmt(val)}")
        if self.num_samples > 1 and not self.sampled:
            parts.append(f"rep{point.repeat}")
        return ",".join(parts) or self.name

    def trial_key(self, point: TrialPoint, trial_id: str | None = None) -> str:
        """Directory name of a trial's Ray Train run: deterministic, so a re-run finds its checkpoints.
        Grid trials are named by their values; trials with sampled values also by their Tune trial id
        (two random samples may coincide)."""
        ident = {"variant": point.variant, "values": point.values, "repeat": point.repeat}
        if self.sampled:
            ident["trial_id"] = trial_id
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label(point))[:60].strip("_") or "trial"
        return f"{slug}-{digest}"

    def paper_row(self, point: TrialPoint) -> str | None:
        v = self.variant(point.variant)
        return v.paper_row if v is not None else None

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between an interrupted sweep and its continuation: the trials and what the
        sweep sets for each (not the code's defaults, which may gain keys between two invocations)."""
        trials = []
        for p in self.grid_points():
            preset, layers = self.trial_overrides(p)
            trials.append({"label": self.label(p), "preset": preset, "overrides": [o for _, o in layers]})
        return json.loads(json.dumps({"trials": trials, "search": [dataclasses.asdict(d) for d in self.search],
                                      "num_samples": self.num_samples}, default=str))

    def training_metrics(self) -> set[str]:
        """Metric names any trial evaluates during training (the config's metrics.names)."""
        names: set[str] = set()
        for p in self.grid_points():
            try:
                section = getattr(self.trial_config(p), "metrics", None)
            except ConfigError:
                continue
            if section is not None and getattr(section, "kimg", 0) > 0:
                names |= {n.strip() for n in str(getattr(section, "names", "")).split(",") if n.strip()}
        return names


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --------------------------------------------------------------------------------------------------
# Parsing with line numbers


class _Where:
    """Maps a key path in the parsed file to 'FILE line N' (or to the --set argument that set it)."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
        if root is not None:
            self._walk(root, ())
        self.set_args: dict[tuple, str] = {}

    def _walk(self, node: yaml.Node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
                self.lines[prefix + (key,)] = k.start_mark.line + 1
                self._walk(v, prefix + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[prefix + (i,)] = item.start_mark.line + 1
                self._walk(item, prefix + (i,))

    def __call__(self, *path) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in self.set_args:
                return f"--set {self.set_args[path[:n]]}"
            if path[:n] in self.lines:
                return f"{self.path} line {self.lines[path[:n]]}"
        return self.path


def _closest(key: str, candidates) -> str:
    match = difflib.get_close_matches(str(key), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_keys(data: dict, allowed, where: _Where, path: tuple, what: str) -> None:
    for k in data:
        if k not in allowed:
            raise SweepError(f"{where(*path, k)}: unknown {what} key '{k}'{_closest(k, allowed)}; "
                             f"allowed: {', '.join(allowed)}.")


def _mapping(value: Any, where: _Where, path: tuple, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where(*path)}: '{what}' must be a mapping, got {_show(value)}.")
    return value


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, where: _Where, path: tuple, name: str, minimum: int | None = None,
         allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{where(*path)}: '{name}' expects an integer, got {_show(value)}.")
    if minimum is not None and value < minimum:
        raise SweepError(f"{where(*path)}: '{name}' must be at least {minimum}, got {value}.")
    return value


def _num(value: Any, where: _Where, path: tuple, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where(*path)}: '{name}' expects a number, got {_show(value)}.")
    if positive and value <= 0:
        raise SweepError(f"{where(*path)}: '{name}' must be positive, got {value}.")
    return float(value)


def _str(value: Any, where: _Where, path: tuple, name: str, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SweepError(f"{where(*path)}: '{name}' expects a non-empty string, got {_show(value)}.")
    return value


def _preset(value: Any, where: _Where, path: tuple) -> str | None:
    if value is None:
        return None
    if str(value) not in TABLE1_PRESETS:
        raise SweepError(f"{where(*path)}: unknown preset {_show(value)}; choose one of "
                         f"{', '.join(TABLE1_PRESETS)}.")
    return str(value)


def _config_overrides(value: Any, where: _Where, path: tuple) -> dict[str, Any]:
    """Nested ({generator: {mapping_layers: 2}}) or dotted keys -> flat dotted keys, each checked."""
    data = _mapping(value, where, path, "overrides")
    keys = all_keys()
    flat: dict[str, Any] = {}
    for k, v in data.items():
        k = str(k)
        items = [(f"{k}.{kk}", vv, where(*path, k, kk)) for kk, vv in v.items()] \
            if "." not in k and isinstance(v, dict) else [(k, v, where(*path, k))]
        for key, val, loc in items:
            if key not in keys:
                raise SweepError(f"{loc}: unknown config key '{key}'{_closest(key, keys)}.")
            try:
                apply_overrides(Config(), {key: val}, loc)
            except ConfigError as e:
                raise SweepError(f"{loc}: {_lower_first(str(e))}") from None
            flat[key] = val
    return flat


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:2] != s[:2].upper() else s


def _dimension(key: str, spec: Any, where: _Where, path: tuple) -> Dimension:
    loc = where(*path)
    if key != PRESET_KEY and key not in all_keys():
        raise SweepError(f"{loc}: unknown search key '{key}'{_closest(key, all_keys() + [PRESET_KEY])}; search "
                         f"keys are config keys like generator.mixing_prob, or 'preset'.")
    if isinstance(spec, list):
        kind, values = "grid", spec
    elif isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SweepError(f"{loc}: search key '{key}' must be a list (a grid) or one of "
                             f"{{{': ..., '.join(DOMAINS)}: ...}}, got {_show(spec)}.")
        kind, values = next(iter(spec.items()))
    else:
        raise SweepError(f"{loc}: search key '{key}' has the single value {_show(spec)}; give a list of values "
                         f"(a grid), or put a fixed value under base.overrides.")
    if not isinstance(values, list):
        raise SweepError(f"{loc}: search key '{key}': {kind} expects a list, got {_show(values)}.")
    if not values:
        raise SweepError(f"{loc}: search key '{key}' has an empty {kind}; give at least one value.")
    if kind in ("grid", "choice"):
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise SweepError(f"{loc}: search key '{key}' lists a value twice.")
        for v in values:
            if key == PRESET_KEY:
                _preset(v, where, path)
            else:
                try:
                    apply_overrides(Config(), {key: v}, loc)
                except ConfigError as e:
                    raise SweepError(f"{loc}: {_lower_first(str(e))}") from None
        return Dimension(key, kind, tuple(values))
    if key == PRESET_KEY:
        raise SweepError(f"{loc}: 'preset' can only be searched with a grid or choice.")
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SweepError(f"{loc}: search key '{key}': {kind} expects [low, high] numbers, got {_show(values)}.")
    lo, hi = values
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise SweepError(f"{loc}: search key '{key}': {kind} needs low < high" +
                         (" and low > 0" if kind == "loguniform" else "") + f", got {_show(values)}.")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise SweepError(f"{loc}: search key '{key}': randint expects integer bounds, got {_show(values)}.")
    # The key must accept the numbers this domain draws: floats from (log)uniform, integers from randint.
    probes = (lo, hi) if kind == "randint" else (float(lo), (float(lo) + float(hi)) / 2)
    for probe in probes:
        try:
            apply_overrides(Config(), {key: probe}, loc)
        except ConfigError as e:
            raise SweepError(f"{loc}: {_lower_first(str(e))}") from None
    return Dimension(key, kind, (lo, hi))


def _apply_set_args(data: dict, set_args: list[str] | None, where: _Where) -> dict[str, Any]:
    """Sweep keys given with --set go into ``data``; config keys are returned (applied to every trial)."""
    config_sets: dict[str, Any] = {}
    nested = {"resources": RESOURCE_KEYS, "evaluate": EVALUATE_KEYS, "objective": OBJECTIVE_KEYS,
              "scheduler": SCHEDULER_KEYS}
    for item in set_args or []:
        if "=" not in item:
            raise SweepError(f"--set expects key=value, got '{item}'.")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise SweepError(f"--set {key}: could not parse the value '{raw}'.") from None
        head, _, rest = key.partition(".")
        if head in ("search", "base", "trials"):
            if head != "search" or not rest:
                raise SweepError(f"--set {key}: only search.KEY=[values] can be set from the command line; edit "
                                 f"the file for base and trials (config keys given with --set apply to every trial).")
            data["search"] = {**(data.get("search") or {}), rest: value}
            where.set_args[("search", rest)] = item
        elif head in nested and rest:
            parts = rest.split(".")
            if parts[0] not in nested[head]:
                raise SweepError(f"--set {key}: unknown {head} key '{parts[0]}'{_closest(parts[0], nested[head])}.")
            section = data.get(head)
            section = dict(section) if isinstance(section, dict) else {}
            target = section
            for p in parts[:-1]:
                target[p] = dict(target.get(p) or {})
                target = target[p]
            target[parts[-1]] = value
            data[head] = section
            where.set_args[(head, *parts)] = item
        elif head in TOP_KEYS and not rest:
            data[head] = value
            where.set_args[(head,)] = item
        elif key in all_keys():
            config_sets[key] = value
        else:
            raise SweepError(f"--set {key}: not a sweep key nor a config key"
                             f"{_closest(key, list(TOP_KEYS) + all_keys())}.")
    try:
        apply_overrides(Config(), config_sets, "--set")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return config_sets


def load_sweep(path: str | Path, set_args: list[str] | None = None) -> SweepSpec:
    """Parse and validate a sweep file (plus ``--set`` arguments); every trial's config is resolved once,
    so an invalid combination fails here, before anything starts."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"Sweep file {path} does not exist.")
    text = path.read_text()
    shown = str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or "it could not be parsed"
        at = f" line {mark.line + 1}" if mark is not None else ""
        ctx = getattr(e, "context_mark", None)
        if ctx is not None and mark is not None and ctx.line != mark.line and getattr(e, "context", None):
            problem += f"; {e.context} at line {ctx.line + 1}"
        raise SweepError(f"{shown}{at}: not valid YAML ({problem}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepError(f"{shown}: a sweep file must be a mapping of keys (name, base, search, ...), "
                         f"not a {type(data).__name__}.")
    where = _Where(shown, text)
    _check_keys(data, TOP_KEYS, where, (), "sweep")
    config_sets = _apply_set_args(data, set_args, where)

    name = _str(data.get("name"), where, ("name",), "name") or path.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"{where('name')}: the sweep name '{name}' must be a plain directory name "
                         f"(letters, digits, '_', '-', '.').")
    paper_table = _str(data.get("paper_table"), where, ("paper_table",), "paper_table")
    from .compare import PAPER_TABLES  # the paper's values live with the comparison report

    if paper_table is not None and paper_table not in PAPER_TABLES:
        raise SweepError(f"{where('paper_table')}: unknown paper table '{paper_table}'"
                         f"{_closest(paper_table, PAPER_TABLES)}; choose one of {', '.join(PAPER_TABLES)}.")

    base = _mapping(data.get("base"), where, ("base",), "base")
    _check_keys(base, BASE_KEYS, where, ("base",), "base")
    base_preset = _preset(base.get("preset"), where, ("base", "preset"))
    base_config = _str(base.get("config"), where, ("base", "config"), "config")
    if base_config is not None:
        cfg_path = (path.parent / base_config).resolve()
        if not cfg_path.is_file():
            raise SweepError(f"{where('base', 'config')}: the config file {base_config} does not exist "
                             f"(paths are relative to the sweep file).")
        try:
            load_yaml(cfg_path)
        except ConfigError as e:
            raise SweepError(f"{where('base', 'config')}: {_lower_first(str(e))}") from None
        base_config = str(cfg_path)
    base_overrides = _config_overrides(base.get("overrides"), where, ("base", "overrides"))

    search_raw = data.get("search")
    if "search" in data and not search_raw:
        raise SweepError(f"{where('search')}: the search space is empty; list at least one key with its values, "
                         f"or remove 'search' and use 'trials'.")
    search_raw = _mapping(search_raw, where, ("search",), "search")
    dims = tuple(_dimension(str(k), v, where, ("search", k)) for k, v in search_raw.items())

    trials_raw = data.get("trials")
    if "trials" in data and not trials_raw:
        raise SweepError(f"{where('trials')}: 'trials' is empty; list at least one named variant.")
    if trials_raw is not None and not isinstance(trials_raw, list):
        raise SweepError(f"{where('trials')}: 'trials' must be a list of {{name: ..., overrides: ...}}, "
                         f"got {_show(trials_raw)}.")
    variants = []
    for i, t in enumerate(trials_raw or []):
        t = _mapping(t, where, ("trials", i), "trials entry")
        _check_keys(t, TRIAL_KEYS, where, ("trials", i), "trial")
        tname = _str(t.get("name"), where, ("trials", i), "name", allow_none=False)
        if any(v.name == tname for v in variants):
            raise SweepError(f"{where('trials', i)}: the trial name '{tname}' is used twice.")
        if PRESET_KEY in search_raw and t.get("preset") is not None:
            raise SweepError(f"{where('trials', i, 'preset')}: trial '{tname}' sets a preset while 'preset' is "
                             f"also searched; use one of the two.")
        variants.append(Variant(tname, _preset(t.get("preset"), where, ("trials", i, "preset")),
                                _config_overrides(t.get("overrides"), where, ("trials", i, "overrides")),
                                _str(t.get("paper_row"), where, ("trials", i, "paper_row"), "paper_row")))
    if not dims and not variants:
        raise SweepError(f"{shown}: the sweep defines no trials; add a 'search' space or a 'trials' list "
                         f"(for a single run use python -m stylegan_dist.train).")

    res = _mapping(data.get("resources"), where, ("resources",), "resources")
    _check_keys(res, RESOURCE_KEYS, where, ("resources",), "resources")
    gpu = res.get("gpu", "auto")
    if gpu not in (True, False, "auto"):
        raise SweepError(f"{where('resources', 'gpu')}: 'gpu' expects true, false or auto, got {_show(gpu)}.")
    resources = Resources(
        workers=_int(res.get("workers", 1), where, ("resources", "workers"), "workers", 1),
        gpu=gpu,
        cpus_per_worker=_num(res.get("cpus_per_worker", 1.0), where, ("resources", "cpus_per_worker"),
                             "cpus_per_worker", positive=True),
    )

    ev = _mapping(data.get("evaluate"), where, ("evaluate",), "evaluate")
    _check_keys(ev, EVALUATE_KEYS, where, ("evaluate",), "evaluate")
    metrics = ev.get("metrics") or []
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not isinstance(metrics, list):
        raise SweepError(f"{where('evaluate', 'metrics')}: 'metrics' expects a list of metric names, "
                         f"got {_show(metrics)}.")
    for m in metrics:
        if m not in METRIC_NAMES:
            raise SweepError(f"{where('evaluate', 'metrics')}: unknown metric {_show(m)}{_closest(m, METRIC_NAMES)}; "
                             f"choose from {', '.join(METRIC_NAMES)}.")
    weights = _mapping(ev.get("weights"), where, ("evaluate", "weights"), "weights")
    _check_keys(weights, WEIGHT_KEYS, where, ("evaluate", "weights"), "weights")
    for k, v in weights.items():
        _str(v, where, ("evaluate", "weights", k), k)
    ppl_crop = ev.get("ppl_crop", True)
    if not isinstance(ppl_crop, bool):
        raise SweepError(f"{where('evaluate', 'ppl_crop')}: 'ppl_crop' expects true or false, got {_show(ppl_crop)}.")
    evaluate = Evaluate(
        metrics=tuple(dict.fromkeys(metrics)),
        num=_int(ev.get("num"), where, ("evaluate", "num"), "num", 2, allow_none=True),
        batch=_int(ev.get("batch", 32), where, ("evaluate", "batch"), "batch", 1),
        seed=_int(ev.get("seed", 0), where, ("evaluate", "seed"), "seed", 0),
        weights={k: str(Path(v).expanduser()) for k, v in weights.items() if v},
        ppl_crop=ppl_crop,
        cache_dir=_str(ev.get("cache_dir"), where, ("evaluate", "cache_dir"), "cache_dir"),
    )

    obj = _mapping(data.get("objective"), where, ("objective",), "objective")
    _check_keys(obj, OBJECTIVE_KEYS, where, ("objective",), "objective")
    objective_metric = _str(obj.get("metric"), where, ("objective", "metric"), "metric")
    objective_mode = obj.get("mode", "min")
    if objective_mode not in ("min", "max"):
        raise SweepError(f"{where('objective', 'mode')}: 'mode' expects min or max, got {_show(objective_mode)}.")

    scheduler = None
    sch = data.get("scheduler")
    if sch is not None:
        sch = _mapping(sch, where, ("scheduler",), "scheduler")
        _check_keys(sch, SCHEDULER_KEYS, where, ("scheduler",), "scheduler")
        stype = sch.get("type", "asha")
        if stype not in SCHEDULERS:
            raise SweepError(f"{where('scheduler', 'type')}: unknown scheduler {_show(stype)}; choose one of "
                             f"{', '.join(SCHEDULERS)}.")
        smetric = _str(sch.get("metric"), where, ("scheduler", "metric"), "metric") or objective_metric
        if not smetric:
            raise SweepError(f"{where('scheduler')}: the scheduler needs a metric; set scheduler.metric or "
                             f"objective.metric.")
        smode = sch.get("mode", objective_mode)
        if smode not in ("min", "max"):
            raise SweepError(f"{where('scheduler', 'mode')}: 'mode' expects min or max, got {_show(smode)}.")
        max_t = sch.get("max_t")
        scheduler = Scheduler(
            type=stype, metric=smetric, mode=smode,
            time_attr=_str(sch.get("time_attr", "kimg"), where, ("scheduler", "time_attr"), "time_attr"),
            grace_period=_num(sch.get("grace_period", 1200.0), where, ("scheduler", "grace_period"), "grace_period",
                              positive=True),
            reduction_factor=_num(sch.get("reduction_factor", 2.0), where, ("scheduler", "reduction_factor"),
                                  "reduction_factor", positive=True),
            max_t=None if max_t is None else _num(max_t, where, ("scheduler", "max_t"), "max_t", positive=True),
        )
        if scheduler.reduction_factor <= 1:
            raise SweepError(f"{where('scheduler', 'reduction_factor')}: 'reduction_factor' must be above 1.")

    storage = _str(data.get("storage"), where, ("storage",), "storage") or None
    data_dir = _str(data.get("data"), where, ("data",), "data")
    spec = SweepSpec(
        path=shown, name=name, description=str(data.get("description") or "").strip(), paper_table=paper_table,
        data=data_dir, storage=storage, base_preset=base_preset, base_config=base_config,
        base_overrides=base_overrides, set_overrides=config_sets, search=dims, variants=tuple(variants),
        num_samples=_int(data.get("num_samples", 1), where, ("num_samples",), "num_samples", 1),
        seed=_int(data.get("seed", 0), where, ("seed",), "seed", 0),
        resources=resources,
        max_concurrent_trials=_int(data.get("max_concurrent_trials"), where, ("max_concurrent_trials",),
                                   "max_concurrent_trials", 1, allow_none=True),
        evaluate=evaluate, objective_metric=objective_metric, objective_mode=objective_mode, scheduler=scheduler,
        retries=_int(data.get("retries", 1), where, ("retries",), "retries", 0),
        max_failures=_int(data.get("max_failures", 3), where, ("max_failures",), "max_failures", 0),
        keep_checkpoints=_int(data.get("keep_checkpoints"), where, ("keep_checkpoints",), "keep_checkpoints", 1,
                              allow_none=True),
    )
    _check_trial_configs(spec, where)
    if scheduler is not None and scheduler.metric in _all_outputs() and \
            not _outputs_of(spec.training_metrics()) >= {scheduler.metric}:
        raise SweepError(f"{where('scheduler')}: the scheduler acts on '{scheduler.metric}' while trials train, but "
                         f"the trials do not evaluate it during training; add it to the config's metrics.names "
                         f"with metrics.kimg > 0 (for example under base.overrides).")
    return spec


def _outputs_of(names) -> set[str]:
    return {o for n in names for o in METRIC_OUTPUTS.get(n, (n,))}


def _all_outputs() -> set[str]:
    return _outputs_of(METRIC_NAMES)


def _check_trial_configs(spec: SweepSpec, where: _Where) -> None:
    """Resolve every grid trial's config (sampled values at their bounds) so invalid combinations fail now."""
    probes = []
    for p in spec.grid_points():
        values = dict(p.values)
        sampled = [d for d in spec.search if d.sampled]
        if not sampled:
            probes.append((p, TrialPoint(p.variant, values, p.repeat)))
            continue
        for i in range(2):
            for d in sampled:
                values[d.key] = d.values[i] if d.kind != "choice" else d.values[min(i, len(d.values) - 1)]
            probes.append((p, TrialPoint(p.variant, dict(values), p.repeat)))
    for p, probe in probes:
        try:
            spec.trial_config(probe)
        except ConfigError as e:
            if p.variant is not None:
                idx = [v.name for v in spec.variants].index(p.variant)
                loc = where("trials", idx)
            else:
                loc = where("search") if spec.search else spec.path
            raise SweepError(f"{loc}: trial '{spec.label(probe)}' has an invalid config: "
                             f"{_lower_first(str(e))}") from None


def sample_value(d: Dimension, rng) -> Any:
    """A value of a sampled dimension drawn with ``rng`` (numpy Generator); used for dry runs."""
    if d.kind == "choice":
        return d.values[int(rng.integers(len(d.values)))]
    lo, hi = d.values
    if d.kind == "uniform":
        return float(rng.uniform(lo, hi))
    if d.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(rng.integers(lo, hi))  # randint: [low, high), as Tune's
