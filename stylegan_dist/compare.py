"""``python -m stylegan_dist.compare``: a paper-style table of a sweep, from its MLflow experiment.

One row per trial (configuration): FID, perceptual path length (full / end, in Z and W), linear
separability (Z, W), kimg reached and training time, with the paper's published values beside ours
when the sweep reproduces one of the paper's tables (the sweep file's ``paper_table``). Writes
``comparison.md``, ``comparison.csv`` and PNG charts (losses and FID over kimg per trial, final metrics
against the paper) to --out, logs them to the sweep's parent MLflow run under ``comparison/``, and
prints the table.

The tracking store is --tracking-uri, else MLFLOW_TRACKING_URI, else STORAGE/mlflow.db (--storage,
default ./runs), as for training and sweeps. Without sweep runs in the experiment (plain training
runs), every run is a row.

Examples:
  python -m stylegan_dist.compare --experiment table2_mixing
  python -m stylegan_dist.compare --experiment table4_mapping_depth --out reports/table4 --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import posixpath
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .tracking import metric_key, stat_metrics

# --------------------------------------------------------------------------------------------------
# The paper's published values (arXiv 1812.04948, FFHQ), keyed by our metric names.

METRIC_COLUMNS = {  # our metric name -> column title, in table order
    "fid50k": "FID",
    "fid50k_mix2": "FID 2 latents",
    "fid50k_mix3": "FID 3 latents",
    "fid50k_mix4": "FID 4 latents",
    "ppl_zfull": "PPL Z full",
    "ppl_zend": "PPL Z end",
    "ppl_wfull": "PPL W full",
    "ppl_wend": "PPL W end",
    "ls_z": "LS Z",
    "ls_w": "LS W",
    "fid_shapes": "shapes-FID",
}

# The released FFHQ generator (configuration F) as measured by the official metrics code.
_RELEASED_F = {"ppl_zfull": 664.9, "ppl_wfull": 233.3, "ppl_zend": 666.1, "ppl_wend": 197.2, "ls_z": 165.0,
               "ls_w": 3.74}


def _param(params: dict[str, str], key: str) -> str | None:
    return params.get(key)


def _float_key(value: str | None) -> str | None:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return None


def _row_table1(params, tags):
    return tags.get("sweep.preset") or tags.get("sweep.paper_row") or tags.get("sweep.variant")


def _row_table2(params, tags):
    return tags.get("sweep.paper_row") or _float_key(_param(params, "generator.mixing_prob"))


def _row_table3(params, tags):
    return tags.get("sweep.paper_row") or tags.get("sweep.variant")


def _row_table4(params, tags):
    if tags.get("sweep.paper_row"):
        return tags["sweep.paper_row"]
    arch, depth = _param(params, "generator.architecture"), _param(params, "generator.mapping_layers")
    return f"{arch}-{depth}" if arch and depth else None


def _row_noise(params, tags):
    if tags.get("sweep.paper_row"):
        return tags["sweep.paper_row"]
    noise, mix = _param(params, "generator.use_noise"), _float_key(_param(params, "generator.mixing_prob"))
    return f"noise={noise.lower()},mixing={mix}" if noise and mix else None


@dataclass(frozen=True)
class PaperTable:
    title: str
    row_key: Callable[[dict[str, str], dict[str, str]], str | None]
    rows: dict[str, tuple[str, dict[str, float]]]  # key -> (the paper's row label, values)
    note: str = ""
    columns: dict[str, str] = field(default_factory=dict)  # metric -> column title, where the paper's differ
    row_title: str = "paper row"


PAPER_TABLES: dict[str, PaperTable] = {
    "table1": PaperTable(
        "Table 1: FID for configurations A-F (FFHQ)", _row_table1,
        {
            "A": ("A Baseline Progressive GAN", {"fid50k": 8.04}),
            "B": ("B + Tuning (incl. bilinear up/down)", {"fid50k": 5.25}),
            "C": ("C + Add mapping and styles", {"fid50k": 4.85}),
            "D": ("D + Remove traditional input", {"fid50k": 4.88}),
            "E": ("E + Add noise inputs", {"fid50k": 4.42}),
            "F": ("F + Mixing regularization", {"fid50k": 4.40, **_RELEASED_F}),
        },
        "Paper FIDs are FFHQ at 1024x1024 (CelebA-HQ: 7.79, 6.11, 5.34, 5.07, 5.06, 5.17). Row F's path "
        "lengths and separability are those of the released FFHQ generator. Presets A and B here change the "
        "networks only, not the Progressive GAN's training length and hyper-parameters.",
    ),
    "table2": PaperTable(
        "Table 2: FID by mixing regularization probability (FFHQ)", _row_table2,
        {
            "0": ("E 0%", {"fid50k": 4.42, "fid50k_mix2": 8.22, "fid50k_mix3": 12.88, "fid50k_mix4": 17.41}),
            "0.5": ("50%", {"fid50k": 4.41, "fid50k_mix2": 6.10, "fid50k_mix3": 8.71, "fid50k_mix4": 11.61}),
            "0.9": ("F 90%", {"fid50k": 4.40, "fid50k_mix2": 5.11, "fid50k_mix3": 6.88, "fid50k_mix4": 9.03}),
            "1": ("100%", {"fid50k": 4.83, "fid50k_mix2": 5.17, "fid50k_mix3": 6.63, "fid50k_mix4": 8.40}),
        },
        "Rows: mixing regularization probability during training; columns: number of latents mixed at test "
        "time, at distinct random crossover layers (fid50k, fid50k_mix2, fid50k_mix3, fid50k_mix4).",
        columns={"fid50k": "1 latent", "fid50k_mix2": "2 latents", "fid50k_mix3": "3 latents",
                 "fid50k_mix4": "4 latents"},
        row_title="mixing regularization",
    ),
    "table3": PaperTable(
        "Table 3: perceptual path lengths and separability (FFHQ)", _row_table3,
        {
            "B": ("B Traditional generator (Z)", {"fid50k": 5.25, "ppl_zfull": 412.0, "ppl_zend": 415.3,
                                                  "ls_z": 10.78}),
            "D": ("D Style-based generator (W)", {"fid50k": 4.88, "ppl_wfull": 446.2, "ppl_wend": 376.6,
                                                  "ls_w": 3.61}),
            "E": ("E + Add noise inputs (W)", {"fid50k": 4.42, "ppl_wfull": 200.5, "ppl_wend": 160.6,
                                               "ls_w": 3.54}),
            "E+mix50": ("+ Mixing 50% (W)", {"fid50k": 4.41, "ppl_wfull": 231.5, "ppl_wend": 182.1, "ls_w": 3.51}),
            "F": ("F + Mixing 90% (W)", {"fid50k": 4.40, "ppl_wfull": 234.0, "ppl_wend": 195.9, "ls_w": 3.79}),
        },
        "FIDs beside Table 3's rows are the same configurations' values in Tables 1 and 2.",
    ),
    "table4": PaperTable(
        "Table 4: mapping network depth (FFHQ)", _row_table4,
        {
            "traditional-0": ("Traditional 0 (Z)", {"fid50k": 5.25, "ppl_zfull": 412.0, "ppl_zend": 415.3,
                                                    "ls_z": 10.78}),
            "traditional-8": ("Traditional 8 (Z / W)", {"fid50k": 4.87, "ppl_zfull": 896.2, "ppl_zend": 902.0,
                                                        "ls_z": 170.29, "ppl_wfull": 324.5, "ppl_wend": 212.2,
                                                        "ls_w": 6.52}),
            "style-0": ("Style-based 0 (Z)", {"fid50k": 5.06, "ppl_zfull": 283.5, "ppl_zend": 285.5, "ls_z": 9.88}),
            "style-1": ("Style-based 1 (W)", {"fid50k": 4.60, "ppl_wfull": 219.9, "ppl_wend": 209.4, "ls_w": 6.81}),
            "style-2": ("Style-based 2 (W)", {"fid50k": 4.43, "ppl_wfull": 217.8, "ppl_wend": 199.9, "ls_w": 6.25}),
            "style-8": ("Style-based 8 (W)", {"fid50k": 4.40, "ppl_wfull": 234.0, "ppl_wend": 195.9, "ls_w": 3.79}),
        },
        "The paper reports path length and separability in Z for rows marked (Z) and in W for (W); with 0 "
        "mapping layers W = Z.",
    ),
    "noise": PaperTable(
        "Noise inputs with and without mixing regularization (FFHQ; Tables 1 and 3, rows D, E, F)", _row_noise,
        {
            "noise=false,mixing=0": ("D no noise, no mixing", {"fid50k": 4.88, "ppl_wfull": 446.2, "ppl_wend": 376.6,
                                                               "ls_w": 3.61}),
            "noise=true,mixing=0": ("E noise, no mixing", {"fid50k": 4.42, "ppl_wfull": 200.5, "ppl_wend": 160.6,
                                                           "ls_w": 3.54}),
            "noise=true,mixing=0.9": ("F noise, mixing 90%", {"fid50k": 4.40, "ppl_wfull": 234.0, "ppl_wend": 195.9,
                                                              "ls_w": 3.79}),
            "noise=false,mixing=0.9": ("(not in the paper)", {}),
        },
    ),
}


class CompareError(ValueError):
    """A user-facing error; one sentence."""


# --------------------------------------------------------------------------------------------------
# Reading the experiment


@dataclass
class TrialRow:
    run_id: str
    label: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    kimg: float | None
    train_seconds: float | None
    paper_key: str | None = None
    paper_label: str = ""
    paper: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # metric -> [(kimg, value)]


@dataclass
class Comparison:
    experiment: str
    uri: str
    parent_id: str | None
    paper_table: str | None
    description: str
    rows: list[TrialRow]
    swept: list[str]
    objective: tuple[str, str] | None = None  # (metric, min|max): the best row is marked

    def best(self) -> TrialRow | None:
        if self.objective is None:
            return None
        metric, mode = self.objective
        scored = [r for r in self.rows
                  if isinstance(r.metrics.get(metric), float) and not math.isnan(r.metrics[metric])]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda r: r.metrics[metric])


HISTORY_KEYS = ("loss/G", "loss/D", "fid50k", "fid_shapes")  # statistic names (tracking.stat_name)


def _logged_key(stat: str, logged: dict) -> str | None:
    """The MLflow key a run holds ``stat`` under: grouped (metrics/fid50k), or flat in runs logged before."""
    return next((k for k in (metric_key(stat), stat.replace("/", "_")) if k in logged), None)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_all(client, exp_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _dedup_by_step(history) -> list:
    """The last value logged at each step (a resumed run may log a step twice)."""
    by_step = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        by_step[m.step] = m
    return [by_step[s] for s in sorted(by_step)]


def collect(uri: str, experiment: str, parent_id: str | None = None, paper_table: str | None = None) -> Comparison:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"No MLflow experiment named '{experiment}' in {uri}"
                           + (f"; it has: {', '.join(names)}." if names else "; it holds no experiments."))
    runs = _search_all(client, exp.experiment_id)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    parent = None
    if parent_id:
        parent = next((r for r in runs if r.info.run_id == parent_id), None)
        if parent is None:
            raise CompareError(f"Run {parent_id} is not in experiment '{experiment}'.")
    elif parents:
        parent = max(parents, key=lambda r: r.info.start_time or 0)
    if parent is not None:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    else:
        children = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    if not children:
        raise CompareError(f"Experiment '{experiment}' has no trial runs yet"
                           + (f" under sweep run {parent.info.run_id}." if parent else "."))
    ptags = parent.data.tags if parent is not None else {}
    table_name = paper_table or ptags.get("sweep.paper_table") or None
    if table_name and table_name not in PAPER_TABLES:
        raise CompareError(f"Unknown paper table '{table_name}'; choose one of {', '.join(PAPER_TABLES)}.")
    table = PAPER_TABLES.get(table_name) if table_name else None
    try:
        swept = json.loads(ptags.get("sweep.swept", "[]"))
    except ValueError:
        swept = []

    rows = []
    for r in children:
        tags, params = r.data.tags, r.data.params
        history: dict[str, list[tuple[float, float]]] = {}
        for key in HISTORY_KEYS + ("sec_per_tick",):
            logged = _logged_key(key, r.data.metrics)
            if logged is not None:
                hist = _dedup_by_step(client.get_metric_history(r.info.run_id, logged))
                history[key] = [(m.step / 1000.0, m.value) for m in hist]
        ticks = history.pop("sec_per_tick", [])
        metrics = stat_metrics(r.data.metrics)
        kimg = metrics.get("kimg")
        row = TrialRow(
            run_id=r.info.run_id, label=tags.get("mlflow.runName") or r.info.run_name or r.info.run_id[:8],
            status=tags.get("sweep.status") or r.info.status.lower(), params=params, tags=tags,
            metrics=metrics, kimg=kimg, train_seconds=sum(v for _, v in ticks) if ticks else None,
            history=history,
        )
        if table is not None:
            row.paper_key = table.row_key(params, tags)
            if row.paper_key in table.rows:
                row.paper_label, row.paper = table.rows[row.paper_key]
        rows.append(row)
    order = list(table.rows) if table else []

    def sort_key(row: TrialRow):
        rank = order.index(row.paper_key) if row.paper_key in order else len(order)
        return (rank, tags_order(row), row.label)

    def tags_order(row: TrialRow) -> int:
        try:
            return int(row.tags.get("sweep.index", "0"))
        except ValueError:
            return 0

    rows.sort(key=sort_key)
    objective = None
    if ":" in ptags.get("sweep.objective", ""):
        metric, mode = ptags["sweep.objective"].rsplit(":", 1)
        objective = (metric, mode)
    return Comparison(experiment, uri, parent.info.run_id if parent else None, table_name,
                      ptags.get("sweep.description", ""), rows, swept, objective)


# --------------------------------------------------------------------------------------------------
# Table


def _fmt_num(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def metric_columns(comp: Comparison) -> list[str]:
    """Metrics with a value in any row, ours or the paper's."""
    return [m for m in METRIC_COLUMNS if any(m in r.metrics or m in r.paper for r in comp.rows)]


def table_rows(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    cols = metric_columns(comp)
    has_paper = comp.paper_table is not None
    table = PAPER_TABLES.get(comp.paper_table) if has_paper else None
    titles = {**METRIC_COLUMNS, **(table.columns if table else {})}
    header = ["trial"] + ([table.row_title if table else "paper row"] if has_paper else [])
    for m in cols:
        header.append(titles[m])
        if has_paper:
            header.append(f"{titles[m]} (paper)")
    header += ["kimg", "train time", "status"]
    body = []
    best = comp.best()
    for r in comp.rows:
        line = [r.label + (" *" if r is best else "")] + ([r.paper_label or "-"] if has_paper else [])
        for m in cols:
            line.append(_fmt_num(r.metrics.get(m)))
            if has_paper:
                line.append(_fmt_num(r.paper.get(m)))
        line += [_fmt_num(r.kimg, 3) if r.kimg is not None and r.kimg < 100 else _fmt_num(r.kimg, 1),
                 _fmt_time(r.train_seconds), r.status]
        body.append(line)
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(b) for b in body)])


def render_markdown(comp: Comparison) -> str:
    header, body = table_rows(comp)
    table = PAPER_TABLES.get(comp.paper_table) if comp.paper_table else None
    out = [f"# {comp.experiment}", ""]
    if comp.description:
        out += [comp.description, ""]
    if table is not None:
        out += [f"Beside ours: the paper's {table.title} (Karras et al. 2019, arXiv 1812.04948).", ""]
    out += [markdown_table(header, body), ""]
    if table is not None and table.note:
        out += [f"Note: {table.note}", ""]
    if comp.best() is not None:
        out += [f"\\* best {comp.objective[0]} ({comp.objective[1]}) among our trials.", ""]
    out += ["FID: fid50k; PPL: perceptual path length (full: t ~ U[0,1], end: t in {0,1}); LS: linear "
            "separability; '-': not measured. Train time sums the ticks' wall time.", "",
            f"MLflow: experiment '{comp.experiment}' in {comp.uri}"
            + (f", sweep run {comp.parent_id}." if comp.parent_id else ".")]
    return "\n".join(out) + "\n"


def render_csv(comp: Comparison) -> str:
    cols = metric_columns(comp)
    buf = io.StringIO()
    w = csv.writer(buf)
    swept = [k for k in comp.swept if k != "preset"]
    w.writerow(["trial", "run_id", "status", "paper_row", *swept, "kimg", "train_seconds",
                *cols, *(f"{m}_paper" for m in cols)])
    for r in comp.rows:
        w.writerow([r.label, r.run_id, r.status, r.paper_key or "", *(r.params.get(k, "") for k in swept),
                    "" if r.kimg is None else r.kimg, "" if r.train_seconds is None else round(r.train_seconds, 1),
                    *("" if r.metrics.get(m) is None else r.metrics[m] for m in cols),
                    *("" if r.paper.get(m) is None else r.paper[m] for m in cols)])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Charts


def render_charts(comp: Comparison, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no charts.", file=sys.stderr)
        return []
    written = []
    for key, title, fname in (("fid50k", "FID over training", "fid_over_kimg.png"),
                              ("fid_shapes", "Shapes-FID (shapes classifier features) over training",
                               "fid_shapes_over_kimg.png"),
                              ("loss/G", "Generator loss over training", "loss_G_over_kimg.png"),
                              ("loss/D", "Discriminator loss over training", "loss_D_over_kimg.png")):
        series = [(r.label, r.history.get(key, [])) for r in comp.rows if r.history.get(key)]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, pts in series:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        ax.set_xlabel("kimg")
        ax.set_ylabel(key)
        ax.set_title(f"{comp.experiment}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / fname))
        plt.close(fig)
    cols = [m for m in metric_columns(comp) if any(m in r.metrics for r in comp.rows)]
    if cols:
        fig, axes = plt.subplots(1, len(cols), figsize=(max(4.0, 3.2 * len(cols)), 4.2), squeeze=False)
        labels = [r.label for r in comp.rows]
        for ax, m in zip(axes[0], cols):
            xs = range(len(labels))
            ours = [comp_row.metrics.get(m, float("nan")) for comp_row in comp.rows]
            paper = [comp_row.paper.get(m, float("nan")) for comp_row in comp.rows]
            ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="ours")
            if any(not math.isnan(p) for p in paper):
                ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper")
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
            ax.set_title(METRIC_COLUMNS[m])
            ax.legend(fontsize=7)
        fig.suptitle(f"{comp.experiment}: final metrics")
        fig.tight_layout()
        written.append(_save(fig, out / "metrics_vs_paper.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_report(comp: Comparison, out: str | Path, log_to_parent: bool = True) -> list[str]:
    """Markdown, CSV and charts into ``out`` (a directory or a storage URI, each file written atomically); also
    logged to the parent run under comparison/."""
    import tempfile

    from . import storage

    # Rendered into a private directory, then each file copied to ``out`` atomically (storage.upload).
    with tempfile.TemporaryDirectory(prefix="sgd-report-") as tmp:
        local = Path(tmp)
        files = [_write(local / "comparison.md", render_markdown(comp)),
                 _write(local / "comparison.csv", render_csv(comp))]
        files += render_charts(comp, local)
        written = [storage.upload(f, storage.join(out, f.name)) for f in files]
        if log_to_parent and comp.parent_id:
            client = _client(comp.uri)
            for f in files:
                client.log_artifact(comp.parent_id, str(f), "comparison")
    return written


def report(uri: str, experiment: str, out: str | Path | None = None, parent_id: str | None = None,
           paper_table: str | None = None, log_to_parent: bool = True, stream=None) -> Comparison:
    """Collect, write and print; returns the comparison (used by the sweep launcher at the end)."""
    stream = stream or sys.stdout
    comp = collect(uri, experiment, parent_id, paper_table)
    if out is None:
        out = default_out(comp)
    files = write_report(comp, out, log_to_parent)
    header, body = table_rows(comp)
    table = PAPER_TABLES.get(comp.paper_table) if comp.paper_table else None
    print(f"\n{comp.experiment}: {len(comp.rows)} trial(s)" + (f"; paper: {table.title}" if table else ""),
          file=stream)
    print(markdown_table(header, body), file=stream)
    print(f"Wrote {', '.join(posixpath.basename(f) for f in files)} to {out}"
          + (f"; logged to MLflow run {comp.parent_id} under comparison/" if log_to_parent and comp.parent_id else ""),
          file=stream)
    return comp


def default_out(comp: Comparison) -> str:
    from . import storage

    parent_dir = None
    if comp.parent_id:
        parent_dir = _client(comp.uri).get_run(comp.parent_id).data.tags.get("sweep.dir")
    try:
        if parent_dir and storage.is_dir(parent_dir):
            return storage.join(parent_dir, "report")
    except storage.StorageError:
        pass
    return storage.join("reports", comp.experiment)


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", required=True, help="MLflow experiment of the sweep (its name)")
    ap.add_argument("--out", metavar="DIR|URI", help="output folder or storage URI (default: the sweep's report/ "
                    "folder, else reports/EXPERIMENT)")
    ap.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking store (default: MLFLOW_TRACKING_URI, "
                    "else STORAGE/mlflow.db)")
    ap.add_argument("--storage", metavar="DIR", default="runs", help="where sweeps and runs are stored, for the "
                    "default tracking store (default: ./runs)")
    ap.add_argument("--parent", metavar="RUN_ID", help="the sweep run to report (default: the newest sweep run "
                    "in the experiment)")
    ap.add_argument("--paper-table", choices=sorted(PAPER_TABLES), help="compare with this paper table "
                    "(default: the sweep file's paper_table)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's MLflow run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from .cli import fail
    from .storage import StorageError
    from .tracking import absolute_uri, resolve_tracking_uri

    args = parse_args(argv)
    try:
        if args.tracking_uri:
            uri = absolute_uri(args.tracking_uri)
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            uri = resolve_tracking_uri(None)
        else:
            db = Path(args.storage).expanduser().resolve() / "mlflow.db"
            if not db.is_file():
                raise CompareError(f"No MLflow store at {db}; pass --storage (the sweep's storage folder), "
                                   f"--tracking-uri or set MLFLOW_TRACKING_URI.")
            uri = f"sqlite:///{db}"
        report(uri, args.experiment, args.out or None, args.parent, args.paper_table,
               log_to_parent=not args.no_log)
    except (CompareError, StorageError) as e:
        return fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
