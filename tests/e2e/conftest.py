"""End-to-end fixtures: a temporary git + DVC repo holding this project's pipeline files, driven
through the real `longtail` CLI, real DVC and a real MLflow sqlite store."""

import shutil
import subprocess
from pathlib import Path

import pytest

from testkit import ROOT, clean_env

# a short schedule with the structure of the real one: warm-up, two lr milestones, DRW start
FAST = ["dataset=digits", "train.epochs=8", "finetune.start_epoch=6", "train.warmup_epochs=1",
        "train.milestones=[6,7]", "train.batch_size=64"]


def sh(cmd, cwd, check=True, timeout=900, env: dict | None = None):
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                         shell=isinstance(cmd, str))
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def set_params(s_args: list[str]) -> list[str]:
    return [a for kv in s_args for a in ("-S", kv)]


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for f in ("params.yaml", "dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / f, path / f)
    # the stages depend on the project code they run (hashed only; the installed package runs)
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sh(["git", "init", "-q"], path)
    sh(["dvc", "init", "-q"], path)
    sh(["dvc", "config", "core.analytics", "false"], path)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-qm", "pipeline"], path)
    return path


def mlflow_client(repo: Path):
    """An MLflow client of the repo's store (the project's default: sqlite, mlflow.db at its root)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo")
