"""The whole pipeline through `dvc exp run`, the CLI and MLflow, on the embedded digits data."""

import json
import re
from pathlib import Path

import pytest
import yaml

from .conftest import FAST, make_repo, mlflow_client, set_params, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One full experiment (all four stages), shared by the tests below."""
    repo = make_repo(tmp_path_factory.mktemp("e2e") / "repo")
    out = sh(["dvc", "exp", "run", "-n", "first", *set_params(FAST)], repo)
    return repo, out


def test_outputs_metrics_and_plots(ran):
    repo, out = ran
    counts = json.loads((repo / "data/prepared/class_counts.json").read_text())
    assert counts["dataset"] == "digits" and counts["train_images"] == sum(counts["class_counts"])
    assert counts["class_counts"][0] / counts["class_counts"][-1] == pytest.approx(100, rel=0.5)
    m = json.loads((repo / "metrics/eval.json").read_text())
    # epochs are numbered from 1 everywhere: console, eval.json, history.csv, MLflow steps, figures
    assert m["final"]["epoch"] == 8 and 1 <= m["best"]["epoch"] <= 8
    assert "note" not in m and "provenance" not in m  # no prose in metrics; built-in plugins only
    assert 0.0 <= m["final"]["top1"] <= 1.0 and m["final"]["error"] == pytest.approx(1 - m["final"]["top1"])
    assert m["best"]["top1"] >= m["final"]["top1"] - 1e-9 or m["best"]["epoch"] == 8
    assert set(m["shots"]) == {"many", "medium", "few"} and sum(m["shots"].values()) == 10
    history = (repo / "plots/history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 1 + 8
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(1, 9))
    for f in ("metrics/eval.json", "plots/history.csv", "plots/curves.png", "models/final.pt"):
        assert (repo / f).stat().st_mode & 0o777 == 0o644, f  # readable by an MLflow server / other users
    assert len((repo / "plots/per_class.csv").read_text().splitlines()) == 11
    for png in ("curves.png", "per_class.png", "confusion.png"):
        assert (repo / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "evaluate: final epoch 8" in out.stdout + out.stderr
    # progress lines: one per epoch, with throughput and time left
    assert "pretrain epoch 6/8" in out.stderr and "img/s left" in out.stderr


def test_mlflow_has_every_stage_with_curves_and_per_class_results(ran, monkeypatch):
    repo, _ = ran
    monkeypatch.chdir(repo)  # artifact locations are relative to the project root, where `mlflow ui` runs
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    runs = client.search_runs([exp.experiment_id], "tags.`longtail.group` = 'first'")
    by_stage = {r.data.tags.get("longtail.stage", "parent"): r for r in runs}
    assert set(by_stage) == {"parent", "build-dataset", "pretrain", "finetune", "evaluate"}
    parent_run = by_stage.pop("parent")
    parent = parent_run.info.run_id
    # the parent run is what the runs table compares: finished, named, with the headline numbers
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["method"] == "ERM-DRW" and parent_run.data.tags["dataset"] == "digits"
    assert parent_run.info.run_name.startswith("ERM-DRW · digits exp 100 · seed 0")
    assert {"final_top1", "best_top1", "final_many", "final_medium", "final_few", "wall_seconds"} <= set(
        parent_run.data.metrics)
    whole = client.get_metric_history(parent, "train_loss")  # the whole schedule in one place
    assert [m.step for m in whole] == list(range(1, 9))
    for run in by_stage.values():
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED"
        assert run.data.params["loss"] == "ce" and run.data.params["train.epochs"] == "8"
        assert len(run.data.tags["longtail.commit"]) == 40
    # what decides a CPU run's float rounding besides the params: the precision and torch's kernels
    resolved = by_stage["pretrain"].data.params
    if resolved["resolved.device"] == "cpu":  # (train.device: auto; on a CUDA machine the kernels are not the CPU's)
        from pipeline.engine.precision import resolve

        assert resolved["resolved.precision"] == resolve("auto", "cpu").name
        assert re.fullmatch(r"ATen [\w ]+, oneDNN \w+", resolved["resolved.cpu_kernels"]), resolved["resolved.cpu_kernels"]
    pre = client.get_metric_history(by_stage["pretrain"].info.run_id, "test_acc")
    fin = client.get_metric_history(by_stage["finetune"].info.run_id, "test_acc")
    assert [m.step for m in pre] == list(range(1, 7)) and [m.step for m in fin] == [7, 8]
    lr = client.get_metric_history(by_stage["pretrain"].info.run_id, "lr")
    assert [m.value for m in lr][:2] == pytest.approx([0.1, 0.1])
    ev = by_stage["evaluate"].data.metrics
    assert {f"class_acc_final/{i:03d}" for i in range(10)} <= set(ev)
    assert ev["final_top1"] == pytest.approx(json.loads((repo / "metrics/eval.json").read_text())["final"]["top1"])
    arts = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/curves.png", "evaluation/eval.json",
            "evaluation/per_class_table.json"} <= arts
    # artifact locations are relative to the project root; no visible Default experiment
    assert exp.artifact_location == f"mlartifacts/{exp.experiment_id}"
    assert [e.name for e in client.search_experiments()] == ["longtail"]


def _stages_changed(repo: Path) -> set[str]:
    status = json.loads(sh(["dvc", "status", "--json"], repo).stdout or "{}")
    return set(status)


@pytest.mark.parametrize("key, value, expected", [
    ("ratio", 10, {"build_dataset"}),
    ("data.n_max", 50, {"build_dataset"}),
    ("finetune.reweighting", "none", {"finetune"}),
    ("finetune.start_epoch", 5, {"pretrain", "finetune", "evaluate"}),
    ("train.lr", 0.05, {"pretrain", "finetune"}),
    ("train.eval_batch_size", 512, {"pretrain", "finetune", "evaluate"}),
    # whole plugin sections, as reweightings/samplers: a selection without a section must reach longtail's check
    ("losses.ldam", {"s": 10}, {"pretrain", "finetune"}),
    ("reweightings.cb.beta", 0.999, {"pretrain", "finetune"}),
])
def test_each_stage_depends_on_exactly_the_params_it_reads(ran, key, value, expected):
    repo, _ = ran
    original = (repo / "params.yaml").read_text()
    assert _stages_changed(repo) == set()
    raw = yaml.safe_load(original)
    node = raw
    *path, last = key.split(".")
    for k in path:
        node = node[k]
    node[last] = value
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(raw))
        assert _stages_changed(repo) == expected
    finally:
        (repo / "params.yaml").write_text(original)


@pytest.mark.parametrize("code, expected", [
    ("pipeline/methods/losses.py", {"pretrain", "finetune"}),  # a loss's code re-runs training
    ("pipeline/figures.py", {"evaluate"}),
    ("pipeline/data/profiles.py", {"build_dataset"}),
])
def test_each_stage_depends_on_the_code_it_runs(ran, code, expected):
    repo, _ = ran
    original = (repo / code).read_text()
    assert _stages_changed(repo) == set()
    try:
        (repo / code).write_text(original + "\n# changed\n")
        assert _stages_changed(repo) == expected
    finally:
        (repo / code).write_text(original)


@pytest.fixture(scope="module")
def temp_run(ran):
    """A second experiment, run with `--temp` (in a temporary folder, as the queue's workers run)."""
    repo, _ = ran
    sh(["dvc", "exp", "run", "--temp", "-n", "other", *set_params(FAST), "-S", "seed=1"], repo)
    return repo


def test_readme_diff_commands_work_with_two_experiment_names(temp_run):
    repo = temp_run
    for cmd in (["dvc", "exp", "diff", "first", "other"], ["dvc", "metrics", "diff", "first", "other"]):
        out = sh(cmd, repo)
        assert "final.top1" in out.stdout, cmd
    sh(["dvc", "plots", "diff", "first", "other", "-o", "diffplots"], repo)
    page = (repo / "diffplots" / "index.html").read_text()
    assert "first" in page and "other" in page


def test_changing_the_finetune_reweighting_reruns_only_finetune_and_evaluate(ran):
    repo, _ = ran
    out = sh(["dvc", "exp", "run", "-n", "second", *set_params(FAST), "-S", "finetune.reweighting=none"], repo)
    text = out.stdout + out.stderr
    assert "Stage 'build_dataset' didn't change, skipping" in text
    assert "Stage 'pretrain' didn't change, skipping" in text
    assert "Running stage 'finetune'" in text and "Running stage 'evaluate'" in text
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    runs = client.search_runs([exp.experiment_id], "tags.`longtail.group` = 'second'")
    assert {r.data.tags.get("longtail.stage", "parent") for r in runs} == {"parent", "finetune", "evaluate"}


def test_temp_experiment_logs_into_the_project_store(temp_run, monkeypatch):
    repo = temp_run
    monkeypatch.chdir(repo)
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    runs = client.search_runs([exp.experiment_id], "tags.`longtail.group` = 'other'")
    # the dataset is unchanged (DVC restores it and class_counts.json from its cache): only training ran
    assert {r.data.tags.get("longtail.stage", "parent") for r in runs} == {"parent", "pretrain", "finetune", "evaluate"}
    ev = [r for r in runs if r.data.tags.get("longtail.stage") == "evaluate"][0]
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "evaluation")}
    assert (repo / "mlartifacts").is_dir()
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    assert '"name": "other"' in json.dumps(shown)
