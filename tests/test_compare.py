"""The comparison report from an MLflow experiment built by hand (no training): rows, the paper's values
beside ours, Markdown/CSV/PNG outputs, logging to the parent run, errors."""

import csv
import json

import pytest

from stylegan_dist import compare
from stylegan_dist.tracking import RunLogger, create_run


def _sweep(uri: str, experiment: str = "t4", with_paper: bool = True) -> dict:
    parent = create_run(uri, experiment, experiment, {"sweep.trials": "3"},
                        tags={"sweep.role": "parent", "sweep.paper_table": "table4" if with_paper else "",
                              "sweep.swept": json.dumps(["generator.mapping_layers"]),
                              "sweep.objective": "fid50k:min", "sweep.description": "Mapping depth."}
                        if with_paper else {"sweep.role": "parent"})
    trials = {}
    # (label, architecture, depth, fid, ppl_wend, status); style-2 unfinished (no metrics, no FINISHED)
    for i, (label, arch, depth, fid, ppl) in enumerate([("style-8", "style", 8, 7.5, 120.0),
                                                         ("traditional-0", "traditional", 0, 9.25, None),
                                                         ("style-2", "style", 2, None, None)]):
        params = {"generator.architecture": arch, "generator.mapping_layers": str(depth)}
        run = create_run(uri, experiment, label, params,
                         tags={"mlflow.parentRunId": parent, "sweep.role": "trial", "sweep.index": str(i),
                               "sweep.variant": label, "sweep.status": "finished" if fid else "running"})
        log = RunLogger(uri, run)
        for tick, nimg in enumerate((64, 128, 192, 128)):  # the last tick repeats step 128 (a resumed run)
            if fid is None and nimg > 128:
                break
            log.log_metrics({"kimg": nimg / 1000, "loss/G": 1.0 / (tick + 1), "loss/D": 0.5, "sec_per_tick": 10.0},
                            step=nimg)
        if fid is not None:
            log.log_metrics({"fid50k": fid, **({"ppl_wend": ppl} if ppl else {})}, step=192)
            log.terminate("FINISHED")
        trials[label] = run
    create_run(uri, experiment, "unrelated", {}, tags={})  # not a child of the sweep: not a row
    return {"parent": parent, "trials": trials}


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_report_rows_paper_values_and_files(store, tmp_path, capsys):
    ids = _sweep(store)
    out = tmp_path / "report"
    assert compare.main(["--experiment", "t4", "--tracking-uri", store, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    # paper row order: traditional-0, style-2, style-8; the unfinished trial is a row too
    assert [r.split("|")[1].strip() for r in rows] == ["traditional-0", "style-2", "style-8 *"]
    header = [c.strip() for c in text.splitlines()[[i for i, line in enumerate(text.splitlines())
                                                    if line.startswith("| trial")][0]].split("|")[1:-1]]
    t0 = [c.strip() for c in rows[0].split("|")[1:-1]]
    cell = dict(zip(header, t0))
    assert cell["FID"] == "9.25" and cell["FID (paper)"] == "5.25" and cell["PPL Z full (paper)"] == "412.0"
    assert cell["PPL W end"] == "-" and cell["kimg"] == "0.192" and cell["train time"] == "30 s"
    s8 = dict(zip(header, [c.strip() for c in rows[2].split("|")[1:-1]]))
    assert s8["PPL W end"] == "120.0" and s8["PPL W end (paper)"] == "195.9" and s8["LS W (paper)"] == "3.79"
    s2 = dict(zip(header, [c.strip() for c in rows[1].split("|")[1:-1]]))
    assert s2["FID"] == "-" and s2["FID (paper)"] == "4.43" and s2["status"] == "running" and s2["kimg"] == "0.128"

    files = sorted(p.name for p in out.iterdir())
    assert files == ["comparison.csv", "comparison.md", "fid_over_kimg.png", "loss_D_over_kimg.png",
                     "loss_G_over_kimg.png", "metrics_vs_paper.png"]
    assert all((out / f).stat().st_size > 1000 for f in files if f.endswith(".png"))
    md = (out / "comparison.md").read_text()
    assert "Table 4: mapping network depth" in md and "Mapping depth." in md and "best fid50k (min)" in md
    with open(out / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["traditional-0", "style-2", "style-8"]
    assert table[2]["fid50k"] == "7.5" and table[2]["fid50k_paper"] == "4.4" and table[2]["paper_row"] == "style-8"
    assert table[0]["generator.mapping_layers"] == "0" and table[1]["fid50k"] == ""
    assert float(table[0]["train_seconds"]) == 30.0  # three distinct steps of 10 s: the repeated step counts once

    from mlflow.tracking import MlflowClient

    logged = {a.path for a in MlflowClient(store).list_artifacts(ids["parent"], "comparison")}
    assert {f"comparison/{f}" for f in files} == logged


def test_experiment_without_sweep_runs_and_no_paper(store, tmp_path, capsys):
    from stylegan_dist.tracking import create_run as cr

    for name, fid in (("a", 3.0), ("b", 4.0)):
        RunLogger(store, cr(store, "plain", name, {})).log_metrics({"fid50k": fid, "kimg": 1.0}, step=1000)
    assert compare.main(["--experiment", "plain", "--tracking-uri", store, "--out", str(tmp_path / "o"),
                         "--paper-table", "table1"]) == 0
    text = capsys.readouterr().out
    assert "| a " in text and "| b " in text and "Table 1" in text
    assert (tmp_path / "o" / "comparison.csv").read_text().count("\n") == 3


def test_errors(store, tmp_path, capsys):
    _sweep(store)
    assert compare.main(["--experiment", "nope", "--tracking-uri", store, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow logs its own INFO lines before)
    assert err.startswith("error: No MLflow experiment named 'nope'") and "it has: Default, t4." in err
    assert compare.main(["--experiment", "t4", "--storage", str(tmp_path / "empty")]) == 2
    assert "No MLflow store at" in capsys.readouterr().err
    assert compare.main(["--experiment", "t4", "--tracking-uri", store, "--parent", "0" * 32]) == 2
    assert "is not in experiment 't4'" in capsys.readouterr().err


def test_table2_layout_rows_mixing_columns_latents(store, tmp_path, capsys):
    parent = create_run(store, "t2", "t2", {}, tags={"sweep.role": "parent", "sweep.paper_table": "table2"})
    for i, p in enumerate(("0.9", "0.0")):
        run = create_run(store, "t2", f"mixing-{p}", {"generator.mixing_prob": p},
                         tags={"mlflow.parentRunId": parent, "sweep.role": "trial", "sweep.index": str(i)})
        RunLogger(store, run).log_metrics({"fid50k": 10.0 + i, "fid50k_mix2": 11.0 + i, "fid50k_mix3": 12.0 + i,
                                           "fid50k_mix4": 13.0 + i, "kimg": 1.0}, step=1000)
    assert compare.main(["--experiment", "t2", "--tracking-uri", store, "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| trial")).split("|")[1:-1]]
    assert header[:10] == ["trial", "mixing regularization", "1 latent", "1 latent (paper)", "2 latents",
                           "2 latents (paper)", "3 latents", "3 latents (paper)", "4 latents", "4 latents (paper)"]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines
            if line.startswith("| mixing")]
    assert [r[1] for r in rows] == ["E 0%", "F 90%"]  # the paper's row order
    assert rows[0][2:10] == ["11.00", "4.42", "12.00", "8.22", "13.00", "12.88", "14.00", "17.41"]
