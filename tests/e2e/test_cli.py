"""The CLI on real inputs: CIFAR-shaped archives give the published long-tailed sizes; bad input
gives one clear line, a non-zero exit and no half-written outputs."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit import clean_env, project_params
from testkit.cifar import balanced_labels, write_cifar

from pipeline.params import override

from .conftest import sh

pytestmark = pytest.mark.slow
LONGTAIL = shutil.which("longtail")


def _params(path: Path, **top) -> Path:
    raw = override(project_params(), {key.replace("__", "."): value for key, value in top.items()})
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("dataset, classes, imbalance, ratio, expected", [
    ("cifar10", 10, "exp", 100, 12406),
    ("cifar100", 100, "exp", 100, 10847),
    ("cifar10", 10, "step", 10, 27500),
])
def test_build_dataset_gives_the_published_sizes(tmp_path, dataset, classes, imbalance, ratio, expected):
    # the original archive layout with the real sizes (blank images, labels in a shuffled order)
    rng = np.random.default_rng(0)
    write_cifar(tmp_path, dataset, balanced_labels(classes, 50000 // classes, rng),
                balanced_labels(classes, 10000 // classes, rng), images="blank", tarball=True)
    _params(tmp_path, dataset=dataset, imbalance=imbalance, ratio=ratio, data__root=str(tmp_path))
    sh([LONGTAIL, "build-dataset", "--no-track"], tmp_path)
    counts = json.loads((tmp_path / "data/prepared/class_counts.json").read_text())
    assert counts["train_images"] == expected and counts["test_images"] == 10000
    if dataset == "cifar10" and imbalance == "exp":
        assert counts["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _fails(cmd, cwd, *fragments, extra_env=None):
    import subprocess

    out = subprocess.run(cmd, cwd=cwd, env=clean_env(**(extra_env or {})), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    last = out.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: "), out.stderr
    for f in fragments:
        assert f in last[0], (f, last[0])
    return last[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    _params(tmp_path, dataset="digits", loss="nope")
    _fails([LONGTAIL, "check"], tmp_path, "loss: unknown losses plugin 'nope'", "valid:", "ce", "mm")
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "loss: unknown losses plugin 'nope'")
    _params(tmp_path, dataset="digits", train__epochs=2, train__warmup_epochs=1, finetune__start_epoch=5,
            train__milestones=[1], train__milestone_factors=[0.1])
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "finetune.start_epoch (5) is beyond the last epoch")
    _params(tmp_path, dataset="digits", train__epochs=2, train__warmup_epochs=1, finetune__start_epoch=1)
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "train.milestones [160, 180] must all be below "
                                                           "train.epochs (2)", "schedule=short")
    _params(tmp_path, dataset="digits", train__epochs=2, train__warmup_epochs=1, finetune__start_epoch=1,
            train__milestones=[1], train__milestone_factors=[0.1])
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "data/prepared/dataset.npz", "build")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/dataset.npz").write_bytes(b"PK\x03\x04 truncated")
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "dataset.npz")
    sh([LONGTAIL, "build-dataset", "--no-track"], tmp_path)
    _fails([LONGTAIL, "finetune", "--no-track"], tmp_path, "pretrain checkpoint models/pretrain.pt not found",
           "dvc repro pretrain")
    _fails([LONGTAIL, "evaluate", "--no-track"], tmp_path, "final checkpoint models/final.pt not found")
    _params(tmp_path, dataset="digits", train__epochs=2, train__warmup_epochs=1, finetune__start_epoch=1,
            train__milestones=[1], train__milestone_factors=[0.1], losses__ce={"gamma": 2})
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path, "unknown key losses.ce.gamma in params.yaml")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert not list((tmp_path / "data/prepared").glob(".*.tmp"))


def test_a_broken_plugin_package_is_reported(tmp_path):
    site = tmp_path / "site"
    info = site / "brokenloss-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenloss\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[longtail.losses]\nbroken = brokenloss_mod:build\n")
    (site / "brokenloss_mod.py").write_text("import a_dependency_that_is_not_installed\ndef build(c):\n    pass\n")
    extra = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    _params(tmp_path, dataset="digits", loss="broken")
    import subprocess

    listed = subprocess.run([LONGTAIL, "plugins", "check"], cwd=tmp_path, env=clean_env(**extra), capture_output=True, text=True)
    assert listed.returncode == 1 and "broken" in listed.stdout and "BROKEN" in listed.stdout
    _fails([LONGTAIL, "pretrain", "--no-track"], tmp_path,
           "losses plugin 'broken' (brokenloss, brokenloss_mod:build) failed to import: ModuleNotFoundError",
           extra_env=extra)


def test_sigterm_stops_a_stage_cleanly_and_keeps_its_checkpoint(tmp_path):
    """kill / docker stop / scancel send SIGTERM: the stage exits 143 with one line, its MLflow runs end
    KILLED (not RUNNING for ever), its resume checkpoint stays, and the workspace lock is free."""
    import signal
    import subprocess

    from mlflow.tracking import MlflowClient

    _params(tmp_path, dataset="digits", train__epochs=60, train__warmup_epochs=1, finetune__start_epoch=50,
            train__milestones=[55], train__milestone_factors=[0.1], train__checkpoint_every=1)
    sh([LONGTAIL, "build-dataset", "--no-track"], tmp_path)
    proc = subprocess.Popen([LONGTAIL, "pretrain"], cwd=tmp_path, env=clean_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # progress goes to stderr; wait for two epochs: a resume checkpoint exists
        if "pretrain epoch 2/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "pretrain epoch 60/" not in err, err  # stopped, not run to the end
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated (SIGTERM)", err
    assert not (tmp_path / "models/pretrain.pt").exists()  # no half-written output
    assert list((tmp_path / ".longtail/resume").rglob("*.pt"))  # the next run with these params resumes it
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("longtail").experiment_id])
    assert sorted((r.data.tags.get("longtail.stage", "parent"), r.info.status) for r in runs) == \
        [("parent", "KILLED"), ("pretrain", "KILLED")]
    _params(tmp_path, dataset="digits", train__epochs=6, train__warmup_epochs=1, finetune__start_epoch=4,
            train__milestones=[5], train__milestone_factors=[0.1], train__checkpoint_every=1)
    # other epochs: a new fingerprint, so this run starts afresh; the lock the killed one held is free
    out = sh([LONGTAIL, "pretrain", "--no-track"], tmp_path)
    assert (tmp_path / "models/pretrain.pt").exists(), out.stdout
