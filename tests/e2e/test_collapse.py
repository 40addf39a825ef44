"""Collapse guard: named methods train to a finite loss and a non-degenerate model on the embedded
digits data under the full 200-epoch protocol (params.yaml's schedule: lr 0.1, warm-up 5,
milestones 160/180, DRW/DRS from 160, or the method's own).

Run in-process (pretrain + finetune stages, no DVC/MLflow), evaluating only the last epoch. A full
run costs about 1-2 CPU-minutes per method on 2 cores, so CI runs the methods that have diverged
or collapsed before (GUARDED), BALMS with a shorter stage 2 (CI_LENGTH); LONGTAIL_COLLAPSE_ALL=1
runs every named method at its full length (about an hour on 2 CPU cores, minutes on a GPU).
"""

import math
import os

import pytest
import torch

from testkit import project_params

from pipeline import io, registry
from pipeline.build import device_data
from pipeline.data.augment import normalize
from pipeline.data.store import load_dataset
from pipeline.params import override, parse
from pipeline.method_names import MethodNames
from pipeline.stages import build_dataset, training

pytestmark = pytest.mark.slow

NAMES = MethodNames.load()
# L-Softmax (NaN at epoch 78-88; class-0 collapse once lambda < 1), LS-SVM (NaN in warm-up at lr 0.1),
# BALMS and CB-Focal (their recipes changed; CB-Focal is now Cui et al.'s sigmoid focal loss); BBN (changed too, but twice the cost: 83.6 -> 65.2 -> 69.0% on digits, all
# classes predicted) runs with LONGTAIL_COLLAPSE_ALL=1, which keeps CI under 30 minutes
GUARDED = ["L-Softmax", "LS-SVM", "BALMS", "CB-Focal"]
ALL = bool(os.environ.get("LONGTAIL_COLLAPSE_ALL"))
METHODS = NAMES.names if ALL else GUARDED
# In CI, BALMS's stage 2 runs 500 of the authors' 2,000 meta-sampler steps (its lr schedule spans
# whatever the length is): the full 2,000 take about 9 of the test's 10.5 CPU-minutes on digits, and 500
# about 2.5. LONGTAIL_COLLAPSE_ALL=1 runs every method at its full length.
CI_LENGTH = {} if ALL else {"BALMS": {"finetunes.meta_sampler.iterations": 500}}
MIN_CLASSES = 3


@pytest.fixture(scope="module")
def raw_params():
    return project_params()


@pytest.fixture(scope="module")
def digits(tmp_path_factory, raw_params):
    out = tmp_path_factory.mktemp("digits")
    build_dataset.run(parse(override(raw_params, {"dataset": "digits"})), out_dir=out)
    return out / "dataset.npz"


@torch.no_grad()
def final_predictions(dataset, final):
    """Test-set predictions of the final weights, the model rebuilt from the checkpoint's meta (as the
    evaluate stage does)."""
    ds, state = load_dataset(dataset), io.load_checkpoint(final)
    meta = state["meta"]
    model = registry.build("models", meta["arch"], len(ds.class_counts), meta["in_channels"], meta["head"],
                           params=meta["model_params"], param_key="model")
    model.load_state_dict(state["model"])
    data = device_data(ds, torch.device("cpu"))
    x = normalize(data.x_test, data.mean, data.std)
    pred = torch.cat([model.eval()(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return pred, data.y_test, state


@pytest.mark.parametrize("name", METHODS)
def test_named_method_does_not_collapse(name, digits, raw_params, tmp_path):
    assert set(GUARDED) <= set(NAMES.names)
    p = parse(override(raw_params, {**NAMES.full(name), "dataset": "digits", "train.device": "cpu",
                                    "train.eval_every": 1000, "train.checkpoint_every": 1000,
                                    **CI_LENGTH.get(name, {})}))
    assert p.train.epochs == 200  # the full protocol, not a shortened one
    files = dict(dataset=digits, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    for stage in ("pretrain", "finetune"):
        training.run(stage, p, **files)
    pred, y, state = final_predictions(digits, files["final"])
    bad = [(r["epoch"], r["train_loss"]) for r in state["history"] if not math.isfinite(r["train_loss"])]
    assert not bad, f"{name}: non-finite training loss at (epoch, loss) {bad[:3]}"
    classes = torch.unique(pred).numel()
    acc = (pred == y).float().mean().item()
    assert classes >= MIN_CLASSES, f"{name}: collapsed, predicts {classes} classes on the test set (top-1 {acc:.3f})"
    print(f"{name}: final top-1 {acc:.4f}, {classes} classes predicted, last loss {state['history'][-1]['train_loss']:.4g}")
