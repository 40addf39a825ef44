"""The image-folder source on the real CIFAR-10 images (the developers' offline copy, see the
README's developer section): build CIFAR-10-LT r = 100 (the published 12,406 images) and train one
epoch, end to end through DVC. Skipped where that copy is absent (it is not part of the project)."""

import json
import subprocess
from pathlib import Path

import pytest

from testkit import ROOT

from .conftest import make_repo, set_params, sh

pytestmark = pytest.mark.slow

ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.mark.skipif(not ARCHIVE.exists(), reason=f"no offline CIFAR-10 image tree at {ARCHIVE}")
def test_cifar10_lt_from_the_image_folder_builds_the_published_subset_and_trains(tmp_path):
    tree = tmp_path / "cifar10-jpeg"
    tree.mkdir()
    subprocess.run(["tar", "-xJf", str(ARCHIVE), "-C", str(tree)], check=True)
    repo = make_repo(tmp_path / "repo")
    one_epoch = ["dataset=imagefolder", f"data.root={tree}", "train.epochs=1", "train.warmup_epochs=0",
                 "train.milestones=[]", "train.milestone_factors=[]", "finetune.start_epoch=1"]
    sh(["dvc", "exp", "run", "-n", "cifar", *set_params(one_epoch)], repo, timeout=1800)
    counts = json.loads((repo / "data/prepared/class_counts.json").read_text())
    assert counts["class_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts["train_images"] == 12406
    m = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.0 <= m["final"]["top1"] <= 1.0
    history = (repo / "plots/history.csv").read_text().splitlines()
    assert len(history) == 2
    # it learned: one epoch's mean training loss is below a uniform guess's ln(10) = 2.30
    row = dict(zip(history[0].split(","), history[1].split(",")))
    assert float(row["train_loss"]) < 2.3
