"""The training stages on a tiny real dataset (digits): resumability and split-run equivalence."""

import copy

import pytest
import torch

from pipeline import io
from pipeline.params import parse
from pipeline.stages import build_dataset, training


def tiny(raw: dict, **train) -> dict:
    raw = copy.deepcopy(raw)
    raw.update(dataset="digits", ratio=10)
    raw["train"].update(epochs=4, batch_size=64, warmup_epochs=1, milestones=[3], milestone_factors=[0.1],
                        device="cpu", checkpoint_every=1, **train)
    raw["finetune"]["start_epoch"] = 2
    raw["data"]["n_max"] = 40
    return raw


@pytest.fixture
def prepared(tmp_path, default_params):
    p = parse(tiny(default_params))
    build_dataset.run(p, out_dir=tmp_path / "prepared")
    return p, tmp_path / "prepared" / "dataset.npz"


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_pretrain_plus_finetune_equals_one_uninterrupted_run(prepared, tmp_path):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    split = io.load_checkpoint(tmp_path / "final.pt")

    trainer, _ = training.setup(p, ds)
    trainer.fit(p.train.epochs)
    whole = trainer.state_dict()
    _same(split["model"], whole["model"])
    assert split["epoch"] == whole["epoch"] == 4
    for a, b in zip(split["optimizer"]["state"].values(), whole["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert [r["train_loss"] for r in split["history"]] == [r["train_loss"] for r in whole["history"]]
    # DRW is on exactly from the fine-tune start
    assert [r["reweighted"] for r in split["history"]] == [False, False, True, True]


def test_a_killed_stage_resumes_from_its_last_checkpoint(prepared, tmp_path):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    # simulate a kill after epoch 1: keep the resume file written after the first epoch
    trainer, meta = training.setup(p, ds)
    trainer.fit(1)
    io.save_torch(tmp_path / "r" / "pretrain.pt", {**trainer.state_dict(), "meta": meta,
                                                   "fingerprint": training._fingerprint("pretrain", p, ds)})
    training.run("pretrain", p, **files)
    resumed = io.load_checkpoint(tmp_path / "pre.pt")
    assert not (tmp_path / "r" / "pretrain.pt").exists()

    trainer, _ = training.setup(p, ds)
    trainer.fit(2)
    _same(resumed["model"], trainer.state_dict()["model"])


def test_a_stale_resume_file_is_ignored(prepared, tmp_path, capsys):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    io.save_torch(tmp_path / "r" / "pretrain.pt", {"fingerprint": "other params"})
    training.run("pretrain", p, **files)
    assert "resuming" not in capsys.readouterr().out


def test_finetune_needs_a_matching_pretrain_checkpoint(prepared, tmp_path):
    from pipeline.errors import LongtailError

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    with pytest.raises(LongtailError, match=r"pretrain checkpoint .*pre.pt not found \(run `dvc repro pretrain`"):
        training.run("finetune", p, **files)
    (tmp_path / "pre.pt").write_bytes(b"garbage")
    with pytest.raises(LongtailError, match="is corrupt or unreadable"):
        training.run("finetune", p, **files)


def test_lsoftmax_schedule_split_equals_one_run(prepared, tmp_path):
    # lambda changes at every step here (base 100, gamma 0.5, power 1): the step counter must carry
    # over from pretrain to finetune and into the checkpoints, or the split run differs
    _, ds = prepared
    raw = copy.deepcopy(prepared[0].raw)
    raw["loss"] = "lsoftmax"
    raw["losses"]["lsoftmax"] = {"m": 4, "base": 100.0, "gamma": 0.5, "power": 1.0, "lambda_min": 0.0}
    p = parse(raw)
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    split = io.load_checkpoint(tmp_path / "final.pt")

    trainer, meta = training.setup(p, ds)
    assert meta["head"] == "linear_nobias" and trainer.model.classifier.bias is None
    trainer.fit(p.train.epochs)
    whole = trainer.state_dict()
    steps = sum(-(-n // p.train.batch_size) for n in [len(trainer.data.y_train)] * p.train.epochs)
    assert int(whole["criterion"]["iteration"]) == int(split["criterion"]["iteration"]) == steps
    _same(split["model"], whole["model"])
    assert [r["train_loss"] for r in split["history"]] == [r["train_loss"] for r in whole["history"]]
