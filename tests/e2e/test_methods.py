"""Every method of the paper's comparison runs end to end on the embedded data and reaches MLflow;
a loss scaffolded with `longtail plugins new` installs and trains through `dvc exp run`."""

import json
import os
import subprocess
import sys

import pytest

from pipeline.params import override as _apply, parse
from pipeline.method_names import MethodNames
from pipeline.stages import build_dataset, evaluate, training
from pipeline.tracking import stage_run

from .conftest import FAST, make_repo, set_params, sh

pytestmark = pytest.mark.slow

# every named method of the README's table (pipeline/method_names.yaml), plus one params variant
NAMES = MethodNames.load()
METHODS = {name: NAMES.full(name) for name in NAMES.names}
METHODS["oversample-strong"] = {**NAMES.full("oversample"), "samplers.oversample.strong_augment": True}


def test_every_method_runs_and_reaches_mlflow(tmp_path, default_params, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LONGTAIL_ROOT", str(tmp_path))
    base = _apply(default_params, {"dataset": "digits", "train.epochs": 3, "finetune.start_epoch": 2,
                                   "train.warmup_epochs": 1, "train.milestones": [2], "train.milestone_factors": [0.1],
                                   "train.batch_size": 64, "train.device": "cpu"})
    files = dict(dataset=tmp_path / "prepared" / "dataset.npz", pretrain=tmp_path / "pre.pt",
                 final=tmp_path / "final.pt", resume_dir=tmp_path / "resume")
    build_dataset.run(parse(base), out_dir=tmp_path / "prepared")
    for name, overrides in METHODS.items():
        overrides = dict(overrides)
        for key in ("train.milestones", "train.milestone_factors"):  # the short schedule keeps its own
            overrides.pop(key, None)
        if overrides.get("finetune.start_epoch") == 200:  # a decoupled stage 2 after the whole stage 1
            overrides["finetune.start_epoch"] = base["train"]["epochs"]
        if overrides.get("finetune.strategy") == "meta_sampler":
            # BALMS's stage 2 is 2,000 steps (on digits, 2,000 one-step epochs, each evaluated): about
            # 12 CPU-minutes, most of this test's time; 4 steps run the same code
            overrides["finetunes.meta_sampler.iterations"] = 4
        p = parse(_apply(base, overrides))
        monkeypatch.setenv("DVC_EXP_NAME", name)
        for stage in ("pretrain", "finetune"):
            with stage_run(stage, p.raw) as log:
                training.run(stage, p, log=log, **files)
        with stage_run("evaluate", p.raw) as log:
            evaluate.run(p, log=log, dataset=files["dataset"], final=files["final"],
                         metrics=tmp_path / name / "eval.json", plots=tmp_path / name)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("longtail")
    for name in METHODS:
        runs = client.search_runs([exp.experiment_id], f"tags.`longtail.group` = '{name}' "
                                                       "and tags.`longtail.stage` = 'evaluate'")
        assert len(runs) == 1, name
        m = runs[0].data.metrics
        if name in NAMES.names and "finetune.start_epoch" not in NAMES.full(name):
            assert NAMES.name(runs[0].data.params) == name  # the report names the run as the table does
        saved = json.loads((tmp_path / name / "eval.json").read_text())
        assert m["final_top1"] == pytest.approx(saved["final"]["top1"]), name
        assert 0.0 <= m["final_top1"] <= 1.0


def test_scaffolded_loss_installs_and_trains_through_dvc(tmp_path):
    repo = make_repo(tmp_path / "repo")
    sh(["longtail", "plugins", "new", "scaffolded_ce"], repo)
    assert "scaffolded_ce: {smoothing: 0.0}" in (repo / "params.yaml").read_text()
    pkg = repo / "plugins" / "longtail-scaffolded-ce"
    # installed into a folder of its own on PYTHONPATH, not into the environment the other tests share
    # (they may run at the same time, and list the installed plugins)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
           str(pkg)]
    subprocess.run(pip, check=True, capture_output=True)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(pkg)], repo, env=env)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "add a loss"], repo)
    sh(["dvc", "exp", "run", "-n", "scaffolded", *set_params(FAST), "-S", "loss=scaffolded_ce",
        "-S", "losses.scaffolded_ce.smoothing=0.1"], repo, env=env)
    result = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= result["final"]["top1"] <= 1.0
    # a third-party plugin lives outside the repository: the run records which package and version ran
    version = (pkg / "pyproject.toml").read_text().split('version = "', 1)[1].split('"', 1)[0]
    assert result["provenance"] == {"plugins": {"longtail-scaffolded-ce": version}}
    listed = sh(["longtail", "plugins", "list", "losses"], repo, env=env).stdout
    assert "scaffolded_ce" in listed and "longtail-scaffolded-ce" in listed
