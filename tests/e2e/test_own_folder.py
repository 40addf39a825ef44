"""A user's own image folder that is already long-tailed and holds images of several sizes, trained as
it is (`imbalance: source`, `data.image_size`), end to end through the real CLI, DVC and MLflow: every
training image is kept at one size, the run is named and tagged without a ratio, and the report shows
one `imagefolder source` column."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import make_repo, mlflow_client, set_params, sh

pytestmark = pytest.mark.slow
TRAIN, TEST = (40, 12, 4), 10  # images per class (digits 0, 1, 2)


def _folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    for c, n_train in enumerate(TRAIN):
        images = d.images[d.target == c]
        for split, part in (("train", images[:n_train]), ("test", images[n_train:n_train + TEST])):
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True)
            for i, a in enumerate(part):
                im = Image.fromarray(np.rint(a * 255 / 16).astype(np.uint8))
                if i % 3 == 1:  # photos come in many sizes: some 16x16, some 20x12 (wider than high)
                    im = im.resize((16, 16) if i % 2 else (20, 12))
                im.save(folder / f"{i:03d}.png")
    return root


def test_an_already_long_tailed_folder_trains_as_it_is(tmp_path):
    folder = _folder(tmp_path / "mine")
    base = ["dataset=imagefolder", f"data.root={folder}", "imbalance=source"]
    # its own repo: after a `dvc exp run` DVC 3.67 rewrites params.yaml's lists in block style, and a later
    # `-S train.milestones=[]` on such a list fails inside DVC ("YAML file structure is corrupted")
    other = make_repo(tmp_path / "sizes")
    refused = sh(["dvc", "exp", "run", "-n", "sizes", *set_params(base)], other, check=False)
    assert refused.returncode != 0 and "or set data.image_size (e.g. 32)" in refused.stdout + refused.stderr
    assert not (other / "data/prepared/dataset.npz").exists()
    repo = make_repo(tmp_path / "repo")
    params = [*base, "data.image_size=8", "train.epochs=2",
              "train.warmup_epochs=0", "train.milestones=[]", "train.milestone_factors=[]",
              "finetune.start_epoch=1", "train.batch_size=16"]
    run = sh(["dvc", "exp", "run", "-n", "mine", *set_params(params)], repo, timeout=900)
    assert "imagefolder source (its own counts, r=10): 56 train images [40, 12, 4]" in run.stdout

    counts = json.loads((repo / "data/prepared/class_counts.json").read_text())
    assert counts["class_counts"] == list(TRAIN) and counts["train_images"] == 56
    assert counts["imbalance"] == "source" and counts["ratio"] == 10.0 and counts["n_max"] == 40
    assert counts["classes"] == ["digit0", "digit1", "digit2"] and counts["image_shape"] == [8, 8, 3]
    assert counts["made_with"]["data.image_size"] == 8

    client = mlflow_client(repo)
    exp = client.get_experiment_by_name("longtail")
    parent, = client.search_runs([exp.experiment_id], "tags.`longtail.parent` = 'true'")
    assert " · imagefolder source · seed 0 · " in parent.info.run_name
    assert parent.data.tags["imbalance"] == "source" and parent.data.tags["ratio"] == ""
    assert parent.info.status == "FINISHED" and parent.data.params["data.image_size"] == "8"

    sh(["longtail", "report", "--out", "rep"], repo)
    table = (repo / "rep" / "table.md").read_text()
    assert "imagefolder source" in table and "imagefolder source 100" not in table
