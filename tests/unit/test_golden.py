"""The golden run: a small, complete pipeline run (digits, exp r = 100, ERM-DRW, the short schedule,
fp32 on the CPU, one thread) whose results are pinned in tests/golden/digits_erm_drw_short.json.
Any change of behaviour (data selection, augmentation, sampling order, schedule, model, loss,
evaluation) shows up here, so it has to be deliberate: re-pin with

    LONGTAIL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden.py

and say why in the commit. A pure refactor must leave this file unchanged."""

import json
import os

import pytest
import torch

from testkit import ROOT

from pipeline import io
from pipeline.params import override, parse
from pipeline.stages import build_dataset, evaluate, training

GOLDEN = ROOT / "tests" / "golden" / "digits_erm_drw_short.json"
SETTINGS = {"dataset": "digits", "schedule": "short", "loss": "ce", "seed": 0, "finetune.reweighting": "cb",
            "train.device": "cpu", "train.precision": "fp32", "train.checkpoint_every": 100}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions in a fixed order, whatever the machine's core count
    yield
    torch.set_num_threads(before)


def test_the_golden_run_is_unchanged(tmp_path, default_params, one_thread):
    p = parse(override(default_params, SETTINGS))
    build_dataset.run(p, out_dir=tmp_path / "prepared")
    files = dict(dataset=tmp_path / "prepared" / "dataset.npz", pretrain=tmp_path / "pre.pt",
                 final=tmp_path / "final.pt", resume_dir=tmp_path / "resume")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    result = evaluate.run(p, dataset=files["dataset"], final=files["final"], metrics=tmp_path / "eval.json",
                          plots=tmp_path / "plots")
    state = io.load_checkpoint(files["final"])
    got = {
        "settings": SETTINGS,
        "epochs": state["epoch"],
        "final_top1": round(result["final"]["top1"], 6),
        "best_top1": round(result["best"]["top1"], 6),
        "best_epoch": result["best"]["epoch"],
        "many_medium_few": [None if result["final"][g] is None else round(result["final"][g], 6)
                            for g in ("many", "medium", "few")],
        "train_loss": [round(r["train_loss"], 5) for r in state["history"]],
    }
    if os.environ.get("LONGTAIL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    pinned = json.loads(GOLDEN.read_text())
    assert got == pinned
