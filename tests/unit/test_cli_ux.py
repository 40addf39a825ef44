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


def _longtail(monkeypatch, capsys, *args):
    """`longtail ARGS` through the CLI's entry point (its error boundary included), in this process:
    (exit code, stderr lines)."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["longtail", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_an_output_path_that_cannot_be_made_is_one_line(tmp_path, default_params, monkeypatch, capsys):
    """Fault injection: a file where an output folder must be (plots, data/prepared, .longtail, params.yaml/out),
    a folder where an output file must be (metrics/eval.json) or a path the OS refuses (/proc/x) gave
    FileExistsError / IsADirectoryError / PermissionError / FileNotFoundError tracebacks. Each is one line
    naming the path and the problem, exit 2, and the previous outputs stay whole."""
    raw = tiny_pretrain_finetune(default_params)
    raw.pop("tracking", None)
    p, ds = prepare(tmp_path / "data", raw)  # data/prepared/dataset.npz, as the stages read it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    trainer, meta = training.setup(p, ds)
    (tmp_path / "models").mkdir()
    training.io.save_torch(tmp_path / "models" / "final.pt",
                           {**trainer.state_dict(), "fingerprint": training._fingerprint("finetune", p, ds),
                            "inputs": training._inputs("finetune", p), "meta": meta})
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/eval.json").write_text("previous\n")
    Path("plots").write_text("a file\n")
    assert _longtail(monkeypatch, capsys, "evaluate", "--no-track") == (2, ["error: cannot write plots/: plots is a file"])
    assert Path("metrics/eval.json").read_text() == "previous\n"
    Path("plots").unlink()
    Path("metrics/eval.json").unlink()
    Path("metrics/eval.json").mkdir()
    assert _longtail(monkeypatch, capsys, "evaluate", "--no-track") == (
        2, ["error: cannot write metrics/eval.json: metrics/eval.json is a folder"])
    assert not Path("plots").exists()

    for blocked, line in (
            ("data/prepared", "error: cannot write data/prepared/dataset.npz: data/prepared is a file"),
            (".longtail", "error: cannot write .longtail/workspace.lock: .longtail is a file")):
        kept = Path(f"{blocked}.kept")
        Path(blocked).rename(kept)
        Path(blocked).write_text("a file\n")
        assert _longtail(monkeypatch, capsys, "build-dataset", "--no-track") == (2, [line])
        Path(blocked).unlink()
        kept.rename(blocked)
    # the CLI's error boundary: an OSError about a path that no check foresaw is one line naming it
    Path(".longtail/workspace.lock").unlink()
    Path(".longtail/workspace.lock").mkdir()
    assert _longtail(monkeypatch, capsys, "build-dataset", "--no-track") == (
        2, ["error: .longtail/workspace.lock: Is a directory"])

    assert _longtail(monkeypatch, capsys, "export-images", "params.yaml/out", "--dataset", "digits") == (
        2, ["error: cannot write params.yaml/out: params.yaml is a file"])
    code, err = _longtail(monkeypatch, capsys, "export-images", "/proc/x", "--dataset", "digits")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot write /proc/x: "), err
    assert Path("params.yaml").read_text() == yaml.safe_dump(raw)


def test_a_missing_dvc_or_git_is_one_line_in_every_command_that_runs_them(tmp_path, monkeypatch):
    """`longtail demo` without dvc on PATH (a virtual environment run by its path, not activated) gave a
    FileNotFoundError traceback; `sweep` already said so in one line. Every command that runs dvc or git
    now asks pipeline.tools first."""
    import shutil

    from pipeline import slurm, sweep, tools
    from pipeline.errors import LongtailError

    bin_ = tmp_path / "bin"  # git, but no dvc
    bin_.mkdir()
    (bin_ / "git").symlink_to(shutil.which("git"))
    project = tmp_path / "project"
    project.mkdir()
    for f in ("params.yaml", "dvc.yaml"):
        (project / f).write_text((ROOT / f).read_text())
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):  # a clone: the demo gets as far as dvc
        subprocess.run(["git", *args], cwd=project, env=clean_env(), check=True)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo"], cwd=project, env=clean_env(PATH=str(bin_)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: dvc is not installed or not on PATH"), out.stderr
    if (Path(sys.executable).parent / "dvc").is_file():  # this environment's dvc: run it activated
        assert f"it is in {Path(sys.executable).parent}, the environment longtail runs from" in out.stderr
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for call in (lambda: sweep._dvc(["queue", "status"]), lambda: sweep.start_queue(1), demo.committed_params,
                 lambda: slurm._git(["rev-parse", "HEAD"]), lambda: slurm.has_ref(".", "refs/heads/x")):
        with pytest.raises(LongtailError, match=r"^(dvc|git) is not installed or not on PATH"):
            call()
    monkeypatch.setenv("PATH", str(bin_))
    assert tools.require("git") == str(bin_ / "git")


def test_a_failed_dvc_command_is_named_by_its_error_line_not_its_support_footer(tmp_path, monkeypatch):
    """A dvc command that failed was reported by the last line of its output, DVC's "Having any troubles?
    Hit us up at https://dvc.org/support" footer; its ERROR line said why."""
    from pipeline import sweep
    from pipeline.errors import LongtailError

    monkeypatch.chdir(tmp_path)
    for key, value in clean_env().items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo hi\n    params: [a]\n")
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", "init"], check=True)
    with pytest.raises(LongtailError) as err:  # what `longtail sweep -S` now refuses before DVC runs
        sweep._dvc(["exp", "run", "--queue", "-S", "a=[x"])
    assert str(err.value) == ("`dvc exp run --queue -S a=[x` failed: unexpected error - no viable alternative at "
                              "input '[x'")
    from pipeline.tools import why_failed

    assert why_failed(128, "fatal: not a git repository (or any of the parent directories): .git\n") == \
        "not a git repository (or any of the parent directories): .git"
    assert why_failed(1, "", "one\nlast\n") == "last" and why_failed(3, "", "") == "exit status 3"
