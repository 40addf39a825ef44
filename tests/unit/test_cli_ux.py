"""Small CLI things a user sees: --version, the demo's own summary and params, device lines, noise."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from testkit import ROOT, clean_env, tiny_pretrain_finetune
from testkit.twostage import prepare

from pipeline import build, demo
from pipeline.params import override, parse
from pipeline.stages import training


def test_version_is_fast_and_torch_free():
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['--version']); print(r.output.strip()); "
            "print('torch' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    from importlib.metadata import version

    assert out.stdout.split("\n")[:2] == [f"longtail {version('longtail')}", "False False"]


def test_demo_undoes_workspace_edits_of_params(default_params):
    edited = override(default_params, {"loss": "mm", "train.epochs": 12, "train.milestones": [6, 9]})
    edited["extra_section"] = {"a": 1}
    args = demo.restore_args(default_params, edited)
    assert sorted(args) == sorted(["loss=ce", "train.epochs=200", "train.milestones=[160, 180]",
                                   "~extra_section.a"])
    assert demo.restore_args(default_params, default_params) == []


def test_the_demo_sets_an_image_folder_size_back_to_auto_for_the_digits(default_params):
    """Review: committed params with `data.image_size: 32` (a user's photo folder) made the demo fail,
    since the digits (one size) refuse it. The demo now sets it back to auto, and only then."""
    assert demo.digits_overrides(default_params) == []
    mine = override(default_params, {"dataset": "imagefolder", "data.image_size": 32})
    assert demo.digits_overrides(mine) == ["data.image_size=auto"]
    assert parse(override(mine, {"dataset": "digits", "data.image_size": "auto"})).data.image_size is None
    del default_params["data"]["image_size"]  # a params.yaml from before the key
    assert demo.digits_overrides(default_params) == []


def test_demo_summary_is_compact_and_names_the_method():
    row = {"method": "HMM-LDAM-DRW", "final_top1": 0.8123, "best_top1": 0.83, "best_epoch": 190.0,
           "final_many": 0.97, "final_medium": 0.8, "final_few": None}
    lines = demo.summary([row]).splitlines()
    assert lines[0].split("  ")[0].strip() == "method" and "many / medium / few" in lines[0]
    assert lines[1].startswith("HMM-LDAM-DRW") and "81.2%" in lines[1] and "83.0% (190)" in lines[1]
    assert lines[1].endswith("97.0 / 80.0 / n/a") and all(len(line) <= 80 for line in lines)


def test_demo_duration_is_the_same_in_help_and_readme():
    assert demo.DURATION in (ROOT / "README.md").read_text().replace("\n", " ")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=clean_env(COLUMNS="200"))
    assert demo.DURATION in out.stdout


def test_demo_filters_only_dvcs_missing_hash_warning():
    assert demo.NOISE.search("WARNING: No file hash info found for '/x/models/final.pt'. It won't be created.")
    assert not demo.NOISE.search("ERROR: failed to reproduce 'pretrain'")


def test_device_line_names_the_device_and_warns_about_an_unusable_gpu(monkeypatch):
    monkeypatch.setattr(build, "gpu_present", lambda: "")
    assert build.describe_device(torch.device("cpu")) == "device cpu"
    monkeypatch.setattr(build, "gpu_present", lambda: "/dev/nvidia0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = build.describe_device(torch.device("cpu"))
    assert line.startswith("device cpu\nwarning: a GPU is present (/dev/nvidia0) but torch")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx: f"NVIDIA H200 #{idx}")
    assert build.describe_device(torch.device("cuda")) == "device cuda:0 (NVIDIA H200 #0)"


def test_a_training_stage_names_its_device_as_evaluate_does(tmp_path, default_params, capsys):
    """One device line for every stage ("device cuda:0 (NAME)" / "device cpu"); the training stages
    printed "device cuda (NAME)" and "device cpu (cpu)"."""
    p, ds = prepare(tmp_path, tiny_pretrain_finetune(default_params))
    training.run("pretrain", p, dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt",
                 resume_dir=tmp_path / "r")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("pretrain: device"))
    expected = build.describe_device(training.setup(p, ds)[0].device).partition("\n")[0]
    assert line.startswith(f"pretrain: {expected}, precision "), line


def test_store_creation_prints_no_mlflow_info_lines(tmp_path):
    code = "from pipeline import tracking; tracking.ensure_experiment()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=clean_env(LONGTAIL_ROOT=str(tmp_path), PYTHONPATH=str(ROOT)), check=True)
    assert (tmp_path / "mlflow.db").exists()
    assert "Creating initial MLflow database tables" not in out.stderr and "INFO" not in out.stderr, out.stderr


def test_demo_reads_its_summary_from_the_experiment_its_params_name(monkeypatch, tmp_path, default_params):
    """The demo looked in the default experiment ("longtail", written a second time) even
    when the committed params.yaml names another one."""
    from pipeline import tracking

    committed = override(default_params, {"tracking.experiment": "team-a"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "committed_params", lambda: committed)
    monkeypatch.setattr(demo, "_run_filtered", lambda cmd: 0)
    asked = []
    monkeypatch.setattr(tracking, "parent_summary", lambda group, experiment=None: asked.append(experiment))
    assert demo.run([], True, lambda *a, **k: None) == 0
    assert asked == ["team-a"]


def test_demo_reads_the_committed_params_with_the_projects_yaml_rules(monkeypatch):
    """`weight_decay: 2e-4` is a number for longtail (checks.yaml_load); read as the string '2e-4' the demo
    would 'restore' it as a quoted string, which the stages then refuse."""
    committed = "train: {weight_decay: 2e-4, lr: 0.1}\n"
    monkeypatch.setattr(demo.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=committed, stderr=""))
    params = demo.committed_params()
    assert params == {"train": {"weight_decay": 0.0002, "lr": 0.1}}
    assert demo.restore_args(params, {"train": {"weight_decay": 0.0002, "lr": 0.1}}) == []


def test_a_corrupt_mlflow_store_is_one_line_not_a_traceback(tmp_path):
    """Fault-injection pass: a garbage or truncated mlflow.db gave SQLAlchemy's DatabaseError traceback."""
    for f in ("params.yaml", "dvc.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    (tmp_path / "mlflow.db").write_text("garbage\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "report", "--out", str(tmp_path / "rep")], cwd=tmp_path,
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: the MLflow store sqlite:///{tmp_path / 'mlflow.db'} cannot be read (file is not a database): "
        "restore it from a backup, or move it aside and a new, empty store is made on the next run"]
    assert not (tmp_path / "rep").exists()


def test_a_stage_runs_the_code_of_the_project_it_runs_in(tmp_path):
    """A DVC queue runs each experiment in a temporary copy of the project, but the editable install points at
    the workspace: a queued experiment ran whatever code the workspace held when it started, while DVC recorded
    the hashes of its own copy. A stage command now re-executes itself on the copy's pipeline/."""
    import shutil

    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, tmp_path / f)
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    stage = tmp_path / "pipeline" / "stages" / "build_dataset.py"
    text = stage.read_text()
    marker = "def run(p: Params, out_dir: Path = OUT_DIR, log=None) -> dict:\n"
    assert marker in text
    stage.write_text(text.replace(marker, marker + "    from ..errors import LongtailError\n"
                                        "    raise LongtailError('the project copy ran')\n"))
    longtail = Path(sys.executable).parent / "longtail"
    r = subprocess.run([str(longtail), "build-dataset"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: the project copy ran", r.stderr
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize("command", [["report", "--out", "rep"], ["check"]])
def test_a_key_given_twice_is_one_line_in_every_command_that_reads_params(tmp_path, command):
    """Review: `longtail report` read params.yaml for the experiment name with the bare YAML loader, so a key
    given twice was a ConstructorError traceback there while `longtail check` gave one line."""
    for f in ("params.yaml", "dvc.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    with open(tmp_path / "params.yaml", "a") as fh:
        fh.write("seed: 3\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], cwd=tmp_path, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: params file params.yaml is not valid YAML (line ")
    first = next(i for i, text in enumerate((ROOT / "params.yaml").read_text().splitlines(), 1) if text.startswith("seed:"))
    assert f"the key 'seed' is given twice (first at line {first}); keep one" in line
    assert not (tmp_path / "rep").exists()
