"""Two commands to a table: `longtail sweep ... --run` (real DVC queue, two workers) then
`longtail report`, on the embedded digits data with the FAST schedule: ERM and ERM-DRW x seeds 0, 1.
ERM-DRW differs from ERM only after the fine-tune start, so DVC's run cache can give an ERM-DRW run
its seed's pretrain stage. The two workers write one sqlite MLflow store at the same time."""

import itertools
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from testkit import ROOT, clean_env
from testkit.regenerate import data_files, regenerate, stated_command, with_out, without_source

from .conftest import FAST, make_repo, mlflow_client, set_params, sh

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"
NAMES = {"rep-0": ("ERM", 0), "rep-1": ("ERM-DRW", 0), "rep-2": ("ERM", 1), "rep-3": ("ERM-DRW", 1)}  # seed-major


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("report") / "repo")
    # the project's DVC config (offline `dvc plots show` page) and its template
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / "dvc_plots_template.html", repo / "dvc_plots_template.html")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "plots template"], repo)
    cmd = ["longtail", "sweep", "--method", "ERM,ERM-DRW", "--seeds", "2", "--name", "rep", *set_params(FAST),
           "--run", "-j", "2"]
    # two queue workers on two cores: one thread each
    sweep = subprocess.run(cmd, cwd=repo, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=900)
    if sweep.returncode != 0:
        logs = sh(["dvc", "queue", "logs", "rep-0"], repo, check=False).stdout[-3000:]
        raise AssertionError(f"sweep failed:\n{sweep.stdout}\n{sweep.stderr[-3000:]}\n{logs}")
    rep = sh(["longtail", "report", "--compare", "ERM,ERM-DRW", "--published"], repo)
    return repo, sweep, rep


def _evaluate_runs(repo: Path) -> list:
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    return client, client.search_runs([exp.experiment_id], "tags.`longtail.stage` = 'evaluate'")


def _png_ok(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG, path
    with Image.open(path) as im:
        w, h = im.size
    assert 300 <= w <= 4000 and 200 <= h <= 3000, (path, w, h)


def test_sweep_queued_and_ran_the_grid(swept):
    _, sweep, _ = swept
    for name, (method, seed) in NAMES.items():
        assert f"queued {name}: {method} seed={seed}" in sweep.stdout
    assert "4 succeeded, 0 failed" in sweep.stdout


def test_the_two_workers_wrote_one_store_at_once_and_lost_nothing(swept):
    """Parallel sweeps: the two queue workers' runs overlap in time and all log completely to the one
    sqlite MLflow store (SQLite takes one writer at a time; the tracking layer retries)."""
    repo, _, _ = swept
    db = sqlite3.connect(repo / "mlflow.db")
    runs = db.execute("select t1.value, t2.value, r.run_uuid, r.status, r.start_time, r.end_time from runs r "
                      "join tags t1 on t1.run_uuid = r.run_uuid and t1.key = 'longtail.group' "
                      "join tags t2 on t2.run_uuid = r.run_uuid and t2.key = 'longtail.stage'").fetchall()
    assert {status for *_, status, _, _ in runs} == {"FINISHED"}
    spans = [(start, end, group) for group, _, _, _, start, end in runs]
    assert any(a[0] < b[1] and b[0] < a[1] and a[2] != b[2] for a, b in itertools.combinations(spans, 2)), \
        "no two experiments ran at once"
    by_group = {}
    for group, stage, run_id, *_ in runs:
        by_group.setdefault(group, {}).setdefault(stage, []).append(run_id)
    assert set(by_group) == set(NAMES)

    def steps(run_id, key):
        return [s for (s,) in db.execute("select step from metrics where run_uuid = ? and key = ? order by step",
                                         (run_id, key))]

    for group, stages in by_group.items():
        assert set(stages) <= {"build-dataset", "pretrain", "finetune", "evaluate"}, (group, stages)
        assert all(len(ids) == 1 for ids in stages.values()), (group, stages)
        assert len(stages.get("finetune", [])) == len(stages.get("evaluate", [])) == 1, (group, stages)
        for run_id in stages.get("pretrain", []):  # an ERM-DRW run may take its pretrain from the run cache
            assert steps(run_id, "train_loss") == list(range(1, 7)), group  # MLflow steps: epochs from 1
        assert steps(stages["finetune"][0], "test_acc") == [7, 8], group
        n_class = db.execute("select count(*) from metrics where run_uuid = ? and key like 'class_acc_final/%'",
                             (stages["evaluate"][0],)).fetchone()[0]
        assert n_class == 10, group
    for seed in (0, 1):  # each seed's pretrain ran (and was logged) in one of its two experiments
        assert any(by_group[g].get("pretrain") for g, (_, s) in NAMES.items() if s == seed), seed


def test_table_rows_columns_and_mean_std_from_the_raw_metrics(swept):
    repo, _, rep = swept
    client, runs = _evaluate_runs(repo)
    assert {r.data.tags["longtail.group"] for r in runs} == set(NAMES)
    raw = {}
    for r in runs:
        method, seed = NAMES[r.data.tags["longtail.group"]]
        assert r.data.params["seed"] == str(seed)
        raw.setdefault(method, {})[seed] = r.data.metrics
    # the DVC experiments' metrics/eval.json hold the same numbers
    shown = json.dumps(json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout))
    for m in raw.values():
        for metrics in m.values():
            assert json.dumps(metrics["best_error"]) in shown

    md = (repo / "reports" / "table.md").read_text()
    sections = {title: md.split(title)[1].split("\n## ")[0] for title in
                ("## Top-1 error (%), best epoch", "## Top-1 error (%), final epoch",
                 "## Many / medium / few-shot accuracy (%), final epoch")}
    for title, body in sections.items():
        lines = [line for line in body.splitlines() if line.startswith("|")]
        assert lines[0] == "| method | digits exp 100 |" and len(lines) == 4, title
        assert [line.split(" | ")[0] for line in lines[2:]] == ["| ERM", "| ERM-DRW"]
    for which in ("best", "final"):
        lines = [line for line in sections[f"## Top-1 error (%), {which} epoch"].splitlines() if line.startswith("|")]
        for method, line in zip(("ERM", "ERM-DRW"), lines[2:]):
            v = [100 * raw[method][s][f"{which}_error"] for s in (0, 1)]
            assert line == f"| {method} | {statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f} (n=2) |"
    shots = [line for line in sections["## Many / medium / few-shot accuracy (%), final epoch"].splitlines()
             if line.startswith("| ERM |")][0]
    many = statistics.fmean(100 * raw["ERM"][s]["final_many"] for s in (0, 1))
    assert shots.startswith(f"| ERM | {many:.1f} / ")
    # the command prints the best-epoch table too
    assert "| method | digits exp 100 |" in rep.stdout and "4 runs, 2 rows x 1 settings" in rep.stdout
    # digits is no published setting: the published figures are listed for reference
    assert "None of these runs is in a published setting" in md and "| LDAM-DRW | 22.97 |" in md

    import csv

    with open(repo / "reports" / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["method"], r["dataset"], r["imbalance"], r["ratio"], r["n"], r["seeds"]) for r in rows] == \
        [("ERM", "digits", "exp", "100", "2", "0 1"), ("ERM-DRW", "digits", "exp", "100", "2", "0 1")]
    # each row holds its own method's runs (on this short schedule the two can score alike)
    assert [r["groups"] for r in rows] == ["rep-0 rep-2", "rep-1 rep-3"]
    v = [100 * raw["ERM-DRW"][s]["best_error"] for s in (0, 1)]
    assert float(rows[1]["best_error_mean"]) == pytest.approx(statistics.fmean(v), abs=1e-4)
    assert float(rows[1]["best_error_std"]) == pytest.approx(statistics.stdev(v), abs=1e-4)


def test_figures_are_valid_pngs(swept):
    repo, _, _ = swept
    out = repo / "reports"
    figures = out / "figures"
    _png_ok(figures / "per_class_error_ERM_vs_ERM-DRW_digits_exp_100.png")
    _png_ok(figures / "margins_digits_exp_100.png")
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["rep-0", "rep-1"]  # first seed of each cell
    for run in ("rep-0", "rep-1"):
        for name in ("curves", "confusion", "per_class", "acc_vs_count", "margins"):
            _png_ok(out / "runs" / run / f"{name}.png")
    md = (out / "table.md").read_text()
    assert "(figures/per_class_error_ERM_vs_ERM-DRW_digits_exp_100.png)" in md and "(runs/rep-0/curves.png)" in md
    # the numbers behind the figures: every epoch (FAST: 8) and every class (digits: 10)
    history = (out / "runs" / "rep-0" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 8 and "test_acc" in history[0]
    per_class = (out / "runs" / "rep-0" / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 1 + 10 and "(runs/rep-0/history.csv)" in md


def test_evaluate_logs_the_margins(swept, monkeypatch):
    repo, _, _ = swept
    monkeypatch.chdir(repo)  # artifact locations are relative to the project root, where `mlflow ui` runs
    client, runs = _evaluate_runs(repo)
    run = runs[0].info.run_id
    arts = {a.path for a in client.list_artifacts(run, "evaluation")}
    assert {"evaluation/margins.csv", "evaluation/margins.png", "evaluation/acc_vs_count.png",
            "evaluation/confusion.csv"} <= arts
    path = Path(client.download_artifacts(run, "evaluation/margins.csv", str(repo / "tmp-art")))
    lines = path.read_text().splitlines()
    assert lines[0] == "class,margin" and len(lines) == 1 + 500  # the balanced digits test set
    assert {int(line.split(",")[0]) for line in lines[1:]} == set(range(10))
    # a sample is correct exactly when its margin is positive: the share matches the final top-1
    margins = [float(line.split(",")[1]) for line in lines[1:]]
    top1 = runs[0].data.metrics["final_top1"]
    assert sum(m > 0 for m in margins) / 500 == pytest.approx(top1, abs=1 / 500)


def test_dvc_plots_page_is_offline(swept):
    repo, _, _ = swept
    out = sh(["dvc", "plots", "diff", "rep-0", "rep-1"], repo)
    html = Path(out.stdout.strip().splitlines()[-1].removeprefix("file://")).read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert "window.vegaEmbed" in html and "margins.png" in html and "acc_vs_count.png" in html
    assert os.path.getsize(repo / "dvc_plots" / "index.html") > 1000


def test_the_results_fit_diagnosis_reads_the_runs_own_models(swept, monkeypatch):
    """results/cifar10-lt-r100-short/diagnosis/fit.py: its stage-2 test row is the evaluate stage's per-class
    accuracy of the same experiment, so it read that experiment's models from the DVC cache."""
    repo, _, _ = swept
    monkeypatch.chdir(repo)
    script = ROOT / "results" / "cifar10-lt-r100-short" / "diagnosis" / "fit.py"
    out = sh([sys.executable, str(script), "rep-1"], repo).stdout
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")[2:-1]
            for line in out.splitlines() if line.startswith("| after")}
    assert set(rows) == {(f"after stage {s}", split) for s in (1, 2) for split in ("train", "test")}
    client, runs = _evaluate_runs(repo)
    run = next(r for r in runs if r.data.tags["longtail.group"] == "rep-1")
    path = Path(client.download_artifacts(run.info.run_id, "evaluation/per_class_table.json", str(repo / "fit-art")))
    table = json.loads(path.read_text())
    final = [row[table["columns"].index("acc_final")] for row in table["data"]]
    assert [float(c.strip().rstrip("%")) / 100 for c in rows[("after stage 2", "test")]] == pytest.approx(final, abs=6e-4)
    bad = subprocess.run([sys.executable, str(script), "no-such-exp"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no-such-exp" in bad.stderr


def test_the_command_table_md_states_regenerates_the_tables_from_the_packed_store_alone(swept, tmp_path):
    """A results page commits its MLflow store (mlflow.db + mlartifacts/, as a .tgz) beside the report, so
    that the report can be regenerated after the machine that ran it is gone: the command table.md states,
    run where the store was unpacked (no repo, no params.yaml), writes the same numbers."""
    repo, _, _ = swept
    table_md = repo / "reports" / "table.md"
    assert stated_command(table_md) == ["longtail", "report", "--published", "--compare", "ERM,ERM-DRW",
                                        "--experiment", "longtail", "--out", "reports"]
    with tarfile.open(tmp_path / "mlflow-store.tgz", "w:gz") as tar:
        for name in ("mlflow.db", "mlartifacts"):
            tar.add(repo / name, arcname=name)
    out = regenerate(table_md, tmp_path / "mlflow-store.tgz", tmp_path / "elsewhere")
    before, after = data_files(repo / "reports"), data_files(out)
    assert {"table.csv", "published.csv", "runs/rep-0/history.csv", "runs/rep-1/per_class.csv"} <= set(before)
    assert after == before
    assert with_out(stated_command(out / "table.md"), "reports") == stated_command(table_md)
    assert without_source((out / "table.md").read_text()) == without_source(table_md.read_text())
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(p.name for p in (repo / "reports" / "figures").iterdir())
