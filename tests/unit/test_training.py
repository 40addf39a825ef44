"""The training stages on a tiny real dataset (digits): resumability and split-run equivalence."""

import copy
import sys

import pytest
import torch

from testkit import tiny_pretrain_finetune
from testkit.twostage import RecordingLog, assert_same, prepare

from pipeline import io
from pipeline.params import override, parse
from pipeline.stages import build_dataset, training


@pytest.fixture
def prepared(tmp_path, default_params):
    return prepare(tmp_path, tiny_pretrain_finetune(default_params))


def test_pretrain_plus_finetune_equals_one_uninterrupted_run(prepared, tmp_path):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    split = io.load_checkpoint(tmp_path / "final.pt")

    trainer, _ = training.setup(p, ds)
    trainer.fit(p.train.epochs)
    whole = trainer.state_dict()
    assert_same(split["model"], whole["model"])
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
    assert_same(resumed["model"], trainer.state_dict()["model"])


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
    with pytest.raises(LongtailError, match="is not a torch checkpoint file"):
        training.run("finetune", p, **files)


# -- resume and fine-tune never mix settings; corrupt resume files are set aside

def _killed_after_one_epoch(p, ds, resume_dir):
    trainer, meta = training.setup(p, ds)
    trainer.fit(1)
    io.save_torch(resume_dir / "pretrain.pt", {**trainer.state_dict(), "meta": meta,
                                               "fingerprint": training._fingerprint("pretrain", p, ds),
                                               "inputs": training._inputs("pretrain", p)})


def test_a_resumed_stage_relogs_the_killed_epochs(prepared, tmp_path):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    _killed_after_one_epoch(p, ds, tmp_path / "r")
    log = RecordingLog()
    training.run("pretrain", p, log=log, **files)
    assert log.steps("test_acc") == [1, 2]  # one complete curve in the new run, epochs numbered from 1


def test_a_resume_checkpoint_trained_in_another_precision_is_not_resumed(prepared, tmp_path, capsys):
    """`train.precision: auto` resolves by machine and environment (bf16 on a CPU with native bf16,
    fp32 where torch's kernels are held to AVX2), so the same params can train in either. A queued
    run resumed a bf16 run's epoch-10 checkpoint and went on in fp32: one run of two arithmetics.
    A checkpoint from another precision must be dropped, and the stage start from the beginning."""
    p, ds = prepared
    r = tmp_path / "r"
    _killed_after_one_epoch(p, ds, r)
    state = io.load_checkpoint(r / "pretrain.pt")
    other = {k: v * 0 if v.is_floating_point() else v for k, v in state["model"].items()}  # shows if used
    io.save_torch(r / "pretrain.pt", {**state, "model": other, "meta": {**state["meta"], "precision": "bf16"}})
    training.run("pretrain", p, dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=r)
    out = capsys.readouterr()
    assert "resuming" not in out.out
    assert "trained in bf16, this run resolves to fp32 (train.precision: fp32); moved it to" in out.err
    assert "starting the stage from the beginning" in out.err
    assert len(list(r.glob("pretrain.pt.corrupt-*"))) == 1  # kept, not deleted: hours of training, maybe
    trainer, _ = training.setup(p, ds)
    trainer.fit(2)
    assert_same(io.load_checkpoint(tmp_path / "pre.pt")["model"], trainer.state_dict()["model"])


class _Killed(Exception):
    pass


def test_a_run_killed_in_another_dvc_experiment_is_ended_by_the_one_that_resumes_it(prepared, tmp_path,
                                                                                   monkeypatch):
    """`dvc exp run` names every run anew, so the killed run is in another group than the
    resumed one; the resume checkpoint names it, and the resumed stage marks it (and its parent) KILLED."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-killed")
    real_save = io.save_torch

    def save_then_die(path, obj):  # the first resume checkpoint is written, then a kill -9
        real_save(path, obj)
        raise _Killed

    monkeypatch.setattr(io, "save_torch", save_then_die)
    context = tracking.stage_run("pretrain", p.raw)  # kept: a collected one would end its run as FAILED
    killed = context.__enter__()  # a kill -9 never runs the exit
    with pytest.raises(_Killed):
        training.run("pretrain", p, log=killed, **files)
    monkeypatch.setattr(io, "save_torch", real_save)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-resumed")
    with tracking.stage_run("pretrain", p.raw) as log:
        training.run("pretrain", p, log=log, **files)
    client = MlflowClient(uri)
    status = {rid: client.get_run(rid).info.status
              for rid in (killed.run_id, killed.parent.run_id, log.run_id, log.parent.run_id)}
    assert status == {killed.run_id: "KILLED", killed.parent.run_id: "KILLED", log.run_id: "FINISHED",
                      log.parent.run_id: "RUNNING"}  # the resumed pipeline's parent runs on (evaluate ends it)
    assert sorted(m.step for m in client.get_metric_history(log.run_id, "test_acc")) == [1, 2]


def test_finetune_params_are_in_the_finetune_fingerprint(prepared, default_params):
    p, ds = prepared
    other = parse(tiny_pretrain_finetune(default_params) | {"finetunes": {**default_params["finetunes"],
                                                                          "bbn": {"rebalancing_sampler": "instance"}}})
    assert training._fingerprint("finetune", p, ds) != training._fingerprint("finetune", other, ds)
    assert training._fingerprint("pretrain", p, ds) == training._fingerprint("pretrain", other, ds)


def _dotted(node: dict, prefix: str = "") -> set:
    return {p for k, v in node.items()
            for p in (_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"})}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_fingerprint_covers_exactly_the_params_dvc_tracks_for_its_stage(stage, default_params):
    """A checkpoint is "made with other params" exactly when DVC re-runs its stage: a key only the
    fingerprint held (data.root: the same data moved) made finetune refuse a pretrain that `dvc repro
    pretrain` then called up to date; a key only DVC held would let a resumed run mix settings."""
    import yaml

    from testkit import ROOT

    tracked = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    paths = _dotted(training._inputs(stage, parse(default_params)))
    assert {t for t in tracked if any(p == t or p.startswith(t + ".") for p in paths)} == set(tracked)
    assert {p for p in paths if not any(p == t or p.startswith(t + ".") for t in tracked)} == set()


def test_the_same_data_at_another_data_root_is_the_same_pretrain(prepared, default_params):
    p, ds = prepared
    moved = parse(override(tiny_pretrain_finetune(default_params), {"data.root": "/elsewhere/digits"}))
    for stage in ("pretrain", "finetune"):
        assert training._fingerprint(stage, p, ds) == training._fingerprint(stage, moved, ds)


def test_finetune_refuses_a_pretrain_made_with_other_params(prepared, tmp_path, default_params):
    from pipeline.errors import LongtailError

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    seven = parse(tiny_pretrain_finetune(default_params) | {"seed": 7})
    training.run("pretrain", seven, **files)
    with pytest.raises(LongtailError, match=r"was made with other params .*\(seed: 7 -> 0\).*dvc repro pretrain"):
        training.run("finetune", p, **files)


def test_evaluate_refuses_a_final_checkpoint_made_with_other_params(prepared, tmp_path, default_params):
    """Every load checks the fingerprint; `longtail evaluate` after a params edit must not
    report a stale model under the new params (tags, eval.json)."""
    from pipeline.errors import LongtailError
    from pipeline.stages import evaluate

    p, ds = prepared
    seven = parse(tiny_pretrain_finetune(default_params) | {"seed": 7})
    state = _final_checkpoint(p, ds, tmp_path / "final.pt")
    io.save_torch(tmp_path / "final.pt", {**state, "fingerprint": training._fingerprint("finetune", seven, ds),
                                          "inputs": training._inputs("finetune", seven)})
    with pytest.raises(LongtailError, match=r"final checkpoint .*final.pt was made with other params .*"
                                            r"\(seed: 7 -> 0\): re-run `dvc repro finetune`"):
        evaluate.run(p, dataset=ds, final=tmp_path / "final.pt", metrics=tmp_path / "eval.json",
                     plots=tmp_path / "plots")
    assert not (tmp_path / "eval.json").exists()


def test_a_wrong_structure_pretrain_file_is_named(prepared, tmp_path):
    from pipeline.errors import LongtailError

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    torch.save({"state_dict": {}}, tmp_path / "pre.pt")
    with pytest.raises(LongtailError, match=r"pre.pt is not a longtail checkpoint \(no epoch, model"):
        training.run("finetune", p, **files)


def test_a_corrupt_resume_file_is_set_aside_and_the_stage_restarts(prepared, tmp_path, capsys):
    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    _killed_after_one_epoch(p, ds, tmp_path / "r")
    blob = (tmp_path / "r" / "pretrain.pt").read_bytes()
    (tmp_path / "r" / "pretrain.pt").write_bytes(blob[: len(blob) // 2])  # truncated
    training.run("pretrain", p, **files)
    assert "warning: resume checkpoint" in capsys.readouterr().err
    assert [f.name.split(".corrupt-")[0] for f in (tmp_path / "r").iterdir()] == ["pretrain.pt"]
    assert io.load_checkpoint(tmp_path / "pre.pt")["epoch"] == 2


def _zero_member(path, name, n=None):
    """Zero the first `n` bytes (default: all) of the zip member of a torch file whose name ends in `name`,
    found by its local header: what a bad disk sector or a partial copy does to a checkpoint."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(name))
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        fh.write(bytes(min(n or info.file_size, info.file_size)))


def _optimizer_member(path):
    """The member holding the largest tensor of the optimizer state (a momentum buffer)."""
    import zipfile

    state = io.load_checkpoint(path)
    storages = {t.untyped_storage().data_ptr() for t in state["model"].values()}
    buffers = [b["momentum_buffer"] for b in state["optimizer"]["state"].values()]
    biggest = max((b for b in buffers if b.untyped_storage().data_ptr() not in storages), key=torch.Tensor.numel)
    with zipfile.ZipFile(path) as zf:  # members data/<key>: the one of biggest's size, as torch saves it
        sizes = {i.filename: i.file_size for i in zf.infolist() if "/data/" in i.filename}
    return next(n for n, size in sizes.items() if size == biggest.numel() * biggest.element_size()).split("/", 1)[1]


def test_a_checkpoint_with_damaged_bytes_is_refused_and_a_damaged_resume_file_is_set_aside(prepared, tmp_path,
                                                                                            capsys):
    """Fault injection: torch's zip reader does not check CRCs, so a final.pt whose model bytes were zeroed
    was evaluated (exit 0) and a pretrain.pt with 4 KB of its optimizer state zeroed was fine-tuned on."""
    from pipeline.errors import LongtailError
    from pipeline.stages import evaluate

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    _zero_member(tmp_path / "final.pt", "/data/0")
    with pytest.raises(LongtailError, match=r"^final checkpoint .*final.pt is corrupt \(CRC mismatch in data/0\): "
                                            r"run `dvc repro finetune` to produce it again$"):
        evaluate.run(p, dataset=ds, final=tmp_path / "final.pt", metrics=tmp_path / "eval.json",
                     plots=tmp_path / "plots")
    assert not (tmp_path / "eval.json").exists()
    member = _optimizer_member(tmp_path / "pre.pt")
    _zero_member(tmp_path / "pre.pt", member, 4096)
    with pytest.raises(LongtailError, match=rf"^pretrain checkpoint .*pre.pt is corrupt \(CRC mismatch in {member}\)"):
        training.run("finetune", p, **files)

    _killed_after_one_epoch(p, ds, tmp_path / "r")
    _zero_member(tmp_path / "r" / "pretrain.pt", "/data/0", 4096)
    training.run("pretrain", p, **files)
    assert "warning: resume checkpoint" in capsys.readouterr().err
    assert [f.name.split(".corrupt-")[0] for f in (tmp_path / "r").iterdir()] == ["pretrain.pt"]
    assert io.load_checkpoint(tmp_path / "pre.pt")["epoch"] == 2


def _final_checkpoint(p, ds, path):
    """models/final.pt as the finetune stage saves it (untrained weights: only its structure matters)."""
    trainer, meta = training.setup(p, ds)
    io.save_torch(path, {**trainer.state_dict(), "fingerprint": training._fingerprint("finetune", p, ds),
                         "inputs": training._inputs("finetune", p), "meta": meta})
    return io.load_checkpoint(path)


def _shrunk(state):
    model = dict(state["model"])
    model["conv1.weight"] = model["conv1.weight"][:, :, :2]
    return {**state, "model": model}


@pytest.mark.parametrize("edit, message", [
    (_shrunk, r"model does not fit resnet32: size mismatch for conv1.weight: \[16, 1, 2, 3\] in the checkpoint, "
              r"\[16, 1, 3, 3\] in the model"),
    (lambda s: {**s, "model": {}}, r"model does not fit resnet32: missing conv1.weight, bn1.weight, bn1.bias "
                                   r"and \d+ more"),
    (lambda s: {**s, "model": {**s["model"], "extra": torch.zeros(1)}}, r"model does not fit resnet32: unexpected extra"),
    (lambda s: {**s, "best": {**s["best"], "model": _shrunk(s)["model"]}}, r"best model does not fit resnet32: size"),
    (lambda s: {k: v for k, v in s.items() if k != "best"}, r"no best"),
    (lambda s: {**s, "history": "oops"}, r"history must be a list of epoch rows, got str 'oops'"),
    (lambda s: {**s, "epoch": "four"}, r"epoch must be an epoch count, got str 'four'"),
    (lambda s: {**s, "model": {"conv1.weight": [1, 2]}}, r"model must be a state dict \(parameter name -> tensor\), "
                                                         r"but 'conv1.weight' holds list"),
    (lambda s: {**s, "best": None}, r"best must be a dict, got NoneType"),
])
def test_a_final_checkpoint_of_the_wrong_structure_is_one_line(prepared, tmp_path, edit, message):
    """Fault injection: a final.pt with the right fingerprint but a model of the wrong shape, no `best`, a
    string as history or epoch gave RuntimeError / KeyError / TypeError tracebacks (or was evaluated)."""
    from pipeline.errors import LongtailError
    from pipeline.stages import evaluate

    p, ds = prepared
    state = _final_checkpoint(p, ds, tmp_path / "final.pt")
    io.save_torch(tmp_path / "final.pt", edit(state))
    with pytest.raises(LongtailError, match=rf"^final checkpoint .*final.pt is not a longtail checkpoint \({message}"):
        evaluate.run(p, dataset=ds, final=tmp_path / "final.pt", metrics=tmp_path / "eval.json",
                     plots=tmp_path / "plots")


def test_a_pretrain_or_resume_checkpoint_that_does_not_fit_the_model_is_one_line(prepared, tmp_path, capsys):
    from pipeline.errors import LongtailError

    p, ds = prepared
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    state = _final_checkpoint(p, ds, tmp_path / "pre.pt")
    io.save_torch(tmp_path / "pre.pt", {**_shrunk(state), "fingerprint": training._fingerprint("pretrain", p, ds)})
    with pytest.raises(LongtailError, match=r"pretrain checkpoint .*pre.pt is not a longtail checkpoint \(model does "
                                            r"not fit resnet32: size mismatch for conv1.weight"):
        training.run("finetune", p, **files)
    _killed_after_one_epoch(p, ds, tmp_path / "r")
    io.save_torch(tmp_path / "r" / "pretrain.pt", _shrunk(io.load_checkpoint(tmp_path / "r" / "pretrain.pt")))
    training.run("pretrain", p, **files)
    assert "does not fit resnet32" in capsys.readouterr().err
    assert [f.name.split(".corrupt-")[0] for f in (tmp_path / "r").iterdir()] == ["pretrain.pt"]


def test_a_second_stage_command_in_one_workspace_names_the_holder(tmp_path):
    import subprocess
    import sys

    from pipeline.errors import LongtailError

    lock = tmp_path / ".longtail" / "workspace.lock"
    code = ("import sys, time; from pathlib import Path; from pipeline.io import workspace_lock\n"
            "with workspace_lock('pretrain', Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LongtailError, match=rf"`longtail pretrain` \(pid {holder.pid}\) is running in this "
                                                r"workspace"):
            with io.workspace_lock("finetune", lock):
                pass
    finally:
        holder.kill()
        holder.wait()
    with io.workspace_lock("finetune", lock):  # a dead holder's lock is free
        pass


def test_every_stage_command_takes_the_workspace_lock(tmp_path, default_params, monkeypatch):
    """Each stage command fails at once, before any work, while another
    one holds the workspace; what it checks first is params.yaml (valid here)."""
    import subprocess
    import sys

    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.errors import LongtailError

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_pretrain_finetune(default_params)))
    monkeypatch.chdir(tmp_path)
    code = ("import time; from pipeline.io import workspace_lock\n"
            "with workspace_lock('pretrain'):\n    print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("build-dataset", "pretrain", "finetune", "evaluate"):
            result = CliRunner().invoke(app, [command, "--no-track"])
            assert isinstance(result.exception, LongtailError), (command, result.output, result.exception)
            assert f"`longtail pretrain` (pid {holder.pid}) is running in this workspace" in str(result.exception)
            assert f"before `longtail {command}`" in str(result.exception)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()  # no work was done


# -- a non-finite loss stops the run (issue: NaN went unnoticed and produced a class-0 model) ------

class _NaNAfter(torch.nn.Module):
    """Wraps a loss: from its `bad`-th call on it returns NaN (as a diverging loss would)."""

    def __init__(self, inner, bad: int):
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0
        self.head = inner.head

    def forward(self, logits, target, class_weight=None):
        self.calls += 1
        loss = self.inner(logits, target, class_weight=class_weight)
        return loss * float("nan") if self.calls >= self.bad else loss


def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    from pipeline.engine.trainer import NonFiniteLoss

    p, ds = prepared
    build = training.build_loss
    steps_per_epoch = -(-sum(training.load_dataset(ds).class_counts) // p.train.batch_size)
    # NaN at the second step of the second epoch (epoch 2 of 4, 1-based as printed)
    monkeypatch.setattr(training, "build_loss", lambda p, counts: _NaNAfter(build(p, counts), steps_per_epoch + 2))
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    with pytest.raises(NonFiniteLoss, match=r"^pretrain: non-finite loss at epoch 2, step 2 \(loss nan\)"):
        training.run("pretrain", p, **files)
    assert not (tmp_path / "pre.pt").exists()  # no stage output
    kept = io.load_checkpoint(tmp_path / "r" / "pretrain.pt")  # the last good resume checkpoint (after epoch 1)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_gradient_clipping_bounds_the_update(prepared):
    """train.clip_grad_norm: the global gradient norm seen by the optimizer is at most the limit."""
    p, ds = prepared
    p = parse(tiny_pretrain_finetune(p.raw, clip_grad_norm=0.01))
    trainer, _ = training.setup(p, ds)
    norms = []
    step = trainer.optimizer.step

    def recording_step(*a, **k):
        norms.append(torch.sqrt(sum(q.grad.pow(2).sum() for q in trainer.model.parameters() if q.grad is not None)))
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    trainer.fit(1)
    assert norms and max(norms) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_split_run_is_exact_in_each_precision(tmp_path, default_params, precision):
    """pretrain + finetune equals one uninterrupted run bit for bit, in fp32 and in bf16 autocast."""
    p = parse(tiny_pretrain_finetune(default_params, precision=precision))
    build_dataset.run(p, out_dir=tmp_path / "prepared")
    ds = tmp_path / "prepared" / "dataset.npz"
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    training.run("finetune", p, **files)
    split = io.load_checkpoint(tmp_path / "final.pt")
    assert split["meta"]["precision"] == precision
    trainer, _ = training.setup(p, ds)
    trainer.fit(p.train.epochs)
    assert_same(split["model"], trainer.state_dict()["model"])


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
    assert_same(split["model"], whole["model"])
    assert [r["train_loss"] for r in split["history"]] == [r["train_loss"] for r in whole["history"]]


def test_a_sampler_asks_for_wider_crop_padding_through_last_pad_scale(prepared):
    """The trainer reads a sampler's per-sample crop-padding multipliers (`last_pad_scale`) without
    knowing which sampler it is: scale-2 samples get the augmentation with twice the padding."""
    from pipeline.data.augment import augment, normalize

    p, ds = prepared
    trainer, _ = training.setup(p, ds)
    idx = torch.arange(8)
    scale = torch.tensor([1, 2] * 4)
    gen_state = trainer.aug_gen.get_state()
    x = trainer.prepare(idx, scale)
    d = trainer.data
    g = torch.Generator().manual_seed(0)
    g.set_state(gen_state)
    plain = augment(d.x_train[idx], trainer.pad, trainer.flip, g)
    wide = augment(d.x_train[idx], 2 * trainer.pad, trainer.flip, g)
    expected = normalize(torch.where((scale == 2)[:, None, None, None], wide, plain), d.mean, d.std)
    assert torch.equal(x, expected)
    # the policy's sampler hands its scales to the epoch's batches
    class Scaled:
        last_pad_scale = None

        def indices(self, labels, epoch, epochs, generator):
            order = torch.randperm(len(labels), generator=generator)
            self.last_pad_scale = torch.full((len(order),), 2)
            return order

    from pipeline.engine.trainer import PolicySteps, Rebalance

    trainer.policy = lambda e: Rebalance(None, Scaled())
    trainer.aug_gen.set_state(gen_state)
    order_gen = trainer.sample_gen.get_state()
    x0, _ = next(iter(PolicySteps(trainer).batches(0)))
    g.set_state(gen_state)
    order = torch.randperm(len(d.y_train), generator=torch.Generator().set_state(order_gen))
    first = order[:p.train.batch_size]
    augment(d.x_train[first], trainer.pad, trainer.flip, g)  # the plain crop is drawn first, as before
    assert torch.equal(x0, normalize(augment(d.x_train[first], 2 * trainer.pad, trainer.flip, g), d.mean, d.std))


def test_one_stage_1_serves_every_fine_tune_strategy(prepared, tmp_path):
    """The two-stage methods share stage 1: a pretrain checkpoint made for cRT is accepted by tau-norm
    (the strategy and its params are not pretrain inputs); the fine-tune start still is."""
    from pipeline.params import override

    p, ds = prepared
    raw = override(p.raw, {"finetune.start_epoch": 4, "finetune.reweighting": "none"})
    crt, tau = parse(override(raw, {"finetune.strategy": "crt"})), parse(override(raw, {"finetune.strategy": "tau_norm"}))
    assert training._fingerprint("pretrain", crt, ds) == training._fingerprint("pretrain", tau, ds)
    assert training._fingerprint("finetune", crt, ds) != training._fingerprint("finetune", tau, ds)
    assert training._fingerprint("pretrain", p, ds) != training._fingerprint("pretrain", crt, ds)


def test_a_run_killed_in_a_dvc_temp_copy_resumes_in_the_next_copy(prepared, tmp_path, monkeypatch, capsys):
    """dvc exp run --temp / queue workers train in a temporary copy that is deleted with the run: the
    resume checkpoint lives under the project root instead, so a re-queued experiment resumes."""
    import shutil

    from pipeline.engine.trainer import NonFiniteLoss

    p, ds = prepared
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    steps_per_epoch = -(-sum(training.load_dataset(ds).class_counts) // p.train.batch_size)
    build = training.build_loss

    def attempt(name):
        copy_dir = root / ".dvc" / "tmp" / "exps" / name  # where DVC makes its temp copies
        copy_dir.mkdir(parents=True)
        monkeypatch.chdir(copy_dir)
        return training.run("pretrain", p, dataset=ds, pretrain=copy_dir / "pre.pt", final=copy_dir / "final.pt")

    with monkeypatch.context() as m:  # the first attempt dies in its second epoch
        m.setattr(training, "build_loss", lambda p, counts: _NaNAfter(build(p, counts), steps_per_epoch + 1))
        with pytest.raises(NonFiniteLoss):
            attempt("tmp-1")
    shutil.rmtree(root / ".dvc" / "tmp" / "exps" / "tmp-1")  # DVC removes the temp copy
    capsys.readouterr()
    attempt("tmp-2")
    assert "resuming from" in capsys.readouterr().out
    assert (root / ".dvc" / "tmp" / "exps" / "tmp-2" / "pre.pt").exists()
    assert not any((root / ".longtail" / "resume").iterdir())  # cleaned up after success



@pytest.mark.parametrize("strategy", ["tau_norm", "ncm"])
def test_a_strategy_that_trains_nothing_finishes_in_a_dvc_temp_copy(prepared, tmp_path, monkeypatch, strategy):
    """tau-norm and NCM write no resume checkpoint, so their folder under the project's resume root is
    never made. The stage's clean-up listed it anyway, so a queued tau-norm run died after its work
    with "No such file or directory: .longtail/resume/<fingerprint>"."""
    from pipeline.params import override

    p, ds = prepared
    p = parse(override(p.raw, {"finetune.strategy": strategy, "finetune.start_epoch": p.train.epochs,
                               "finetune.reweighting": "none"}))
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    copy_dir = root / ".dvc" / "tmp" / "exps" / "tmp-1"  # where DVC makes a queued run's temp copy
    copy_dir.mkdir(parents=True)
    monkeypatch.chdir(copy_dir)
    paths = dict(dataset=ds, pretrain=copy_dir / "pre.pt", final=copy_dir / "final.pt")
    training.run("pretrain", p, **paths)
    training.run("finetune", p, **paths)
    assert (copy_dir / "final.pt").exists()
    assert not any((root / ".longtail" / "resume").iterdir())

def test_two_queued_runs_with_the_same_params_do_not_share_a_resume_folder(prepared, tmp_path, monkeypatch, capsys):
    """Two queued experiments with the same params (one queued twice, `-j 2`) have the same fingerprint,
    so the same folder under the project's resume root. The one that finished first used to delete it,
    with the other's checkpoint in it. Now the first claims it; the second, while the first runs, keeps
    its checkpoints in its own temp copy and says so, and the first's checkpoint is still there."""
    from pipeline.params import override

    p, ds = prepared
    p = parse(override(p.raw, {"train.checkpoint_every": 1}))
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    shared = root / ".longtail" / "resume" / (training._fingerprint("pretrain", p, ds)[:16] + "-fp32")
    seen = {}

    def copy(name):
        d = root / ".dvc" / "tmp" / "exps" / name
        d.mkdir(parents=True)
        return d

    class FirstRun:  # the first run's tracking; at its 2nd epoch (checkpoint of the 1st saved), the second runs whole
        run_id = None

        def __getattr__(self, name):
            return lambda *a, **k: None

        def log_epoch(self, row):
            if row["epoch"] == 1:
                seen["first's checkpoint before"] = (shared / "pretrain.pt").exists()
                second = copy("tmp-b")
                monkeypatch.chdir(second)
                training.run("pretrain", p, dataset=ds, pretrain=second / "pre.pt", final=second / "final.pt")
                seen["first's checkpoint after"] = (shared / "pretrain.pt").exists()
                monkeypatch.chdir(first)

    first = copy("tmp-a")
    monkeypatch.chdir(first)
    training.run("pretrain", p, log=FirstRun(), dataset=ds, pretrain=first / "pre.pt", final=first / "final.pt")
    assert seen == {"first's checkpoint before": True, "first's checkpoint after": True}
    assert "another run with the same params" in capsys.readouterr().out
    assert (root / ".dvc" / "tmp" / "exps" / "tmp-b" / "pre.pt").exists() and (first / "pre.pt").exists()
    assert not any((root / ".longtail" / "resume").iterdir())  # both cleaned up, the lock file too



def test_every_rank_of_a_distributed_run_uses_rank_0s_resume_folder(tmp_path, monkeypatch):
    """Only rank 0 claims the shared folder; the other ranks take its choice (broadcast), so a duplicate
    run's ranks do not split between its own folder and the running experiment's checkpoint."""
    root = tmp_path / "project"
    (root / ".dvc" / "tmp" / "exps" / "tmp-a").mkdir(parents=True)
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    monkeypatch.chdir(root / ".dvc" / "tmp" / "exps" / "tmp-a")
    shared = training._resume_dir("0123456789abcdef0123", "fp32")
    told = []
    monkeypatch.setattr(training.distributed, "from_main", lambda v: told.append(v) or str(training.RESUME_DIR))
    monkeypatch.setenv("RANK", "1")
    with training._claimed(shared, "pretrain") as used:  # rank 1: no claim, rank 0's choice
        assert used == training.RESUME_DIR
    assert not (shared.parent / f"{shared.name}.lock").exists()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(training.distributed, "from_main", lambda v: told.append(v) or v)
    with training._claimed(shared, "pretrain") as used:  # rank 0 claims and sends its choice
        assert used == shared and (shared.parent / f"{shared.name}.lock").exists()
    assert told[-1] == str(shared)


def test_a_slurm_workspace_keeps_its_resume_checkpoint_in_itself(tmp_path, monkeypatch):
    """A SLURM job runs in its own workspace under the project (LONGTAIL_ROOT = the project, for
    its store). That workspace outlives a killed job, so its checkpoint stays in it; only DVC temp copies
    (under <project>/.dvc/tmp) use the project's shared resume folder."""
    root = tmp_path / "project"
    ws = root / ".longtail" / "slurm" / "s" / "ws" / "s-0"
    temp = root / ".dvc" / "tmp" / "exps" / "tmpabc"
    for d in (ws, temp):
        d.mkdir(parents=True)
    monkeypatch.setenv("LONGTAIL_ROOT", str(root))
    monkeypatch.chdir(ws)
    assert training._resume_dir("0123456789abcdef0123", "fp32") == training.RESUME_DIR
    monkeypatch.chdir(temp)
    assert training._resume_dir("0123456789abcdef0123", "fp32") == root.resolve() / ".longtail" / "resume" / "0123456789abcdef-fp32"
    monkeypatch.chdir(root)
    assert training._resume_dir("0123456789abcdef0123", "fp32") == training.RESUME_DIR


@pytest.mark.parametrize("key, value", [("ratio", 5), ("imbalance", "step"), ("data.n_max", 30)])
def test_a_stage_refuses_prepared_data_built_with_other_params(prepared, tmp_path, default_params, key, value):
    """Fault-injection pass: `longtail pretrain` (or evaluate) after editing a data param without rebuilding
    trained on the old data and logged the new params. Now one line names the param and the stage to re-run."""
    from pipeline.errors import LongtailError
    from pipeline.stages import evaluate

    p, ds = prepared
    edited = parse(override(tiny_pretrain_finetune(default_params), {key: value}))
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    shown = repr(float(value)) if key == "ratio" else repr(value)
    for run in (lambda: training.run("pretrain", edited, **files),
                lambda: evaluate.run(edited, dataset=ds, final=tmp_path / "final.pt", metrics=tmp_path / "eval.json",
                                     plots=tmp_path / "plots")):
        with pytest.raises(LongtailError, match=rf"prepared dataset .* was built with {key}=.*, but params.yaml has "
                                                rf"{key}={shown}: re-run the build-dataset stage"):
            run()
    assert not (tmp_path / "pre.pt").exists() and not (tmp_path / "eval.json").exists()
    # the same images at another path are the same data
    moved = parse(override(tiny_pretrain_finetune(default_params), {"data.root": "/elsewhere/digits"}))
    from pipeline.data.store import check_built_with, load_dataset
    check_built_with(load_dataset(ds), moved, ds)


def test_a_loss_can_initialise_the_classifier_of_a_new_model(tmp_path, default_params):
    """CB-Focal (sigmoid_focal) starts every class's bias at -log(C - 1) as Cui et al.'s model does; the finetune
    stage loads stage 1's weights over it, so the hook never undoes training."""
    import math

    p, ds = prepare(tmp_path, tiny_pretrain_finetune(default_params) | {"loss": "sigmoid_focal"})
    trainer, _ = training.setup(p, ds)
    bias = trainer.model.classifier.bias.detach()
    assert torch.allclose(bias, torch.full_like(bias, -math.log(len(bias) - 1)))
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    training.run("pretrain", p, **files)
    trained = io.load_checkpoint(tmp_path / "pre.pt", "pretrain checkpoint")["model"]["classifier.bias"]
    assert not torch.allclose(trained, bias)  # stage 1 trained it
    ce_trainer, _ = training.setup(parse(tiny_pretrain_finetune(default_params)), ds)
    assert not torch.allclose(ce_trainer.model.classifier.bias.detach(), bias)  # only the loss that asks


def test_a_checkpoint_from_before_train_nesterov_still_matches(prepared, default_params):
    """train.nesterov came after checkpoints that were made without it: at its default (off) the
    fingerprint is the one those have, so they still load and resume; on, it is other params."""
    p, ds = prepared
    raw = tiny_pretrain_finetune(default_params)
    old = {**raw, "train": {k: v for k, v in raw["train"].items() if k != "nesterov"}}
    on = override(raw, {"train.nesterov": True})
    for stage in ("pretrain", "finetune"):
        assert training._fingerprint(stage, parse(old), ds) == training._fingerprint(stage, p, ds)
        assert training._fingerprint(stage, parse(on), ds) != training._fingerprint(stage, p, ds)


# -- a loss or a sampler that breaks its contract is named at the first batch (row 75) ----------------------------

@pytest.fixture
def contract_breakers(tmp_path, monkeypatch):
    """A loss returning one value per sample, and samplers returning a position past the end or floats."""
    from testkit.plugins import fake_dist

    fake_dist(tmp_path, "breakplug",
              "[longtail.losses]\nvecloss = vecmod:build\n"
              "[longtail.samplers]\npastend = sampmod:build_past_end\nfloaty = sampmod:build_floats\n",
              {"vecmod": "import torch.nn.functional as F\nfrom torch import nn\n\n\nclass Vec(nn.Module):\n"
                         "    head = 'linear'\n\n    def forward(self, logits, target, class_weight=None):\n"
                         "        return F.cross_entropy(logits, target, reduction='none')\n\n\n"
                         "def build(class_counts):\n    return Vec()\n",
               "sampmod": "import torch\n\n\nclass PastEnd:\n    def indices(self, labels, epoch, epochs, generator):\n"
                          "        return torch.arange(len(labels)) + 1\n\n\n"
                          "class Floats:\n    def indices(self, labels, epoch, epochs, generator):\n"
                          "        return torch.zeros(len(labels))\n\n\n"
                          "def build_past_end(class_counts):\n    return PastEnd()\n\n\n"
                          "def build_floats(class_counts):\n    return Floats()\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("vecmod", "sampmod"):
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("settings, message", [
    ({"loss": "vecloss"}, "pretrain: losses plugin 'vecloss' (breakplug, vecmod:build) returned a float32 tensor of "
                          "shape [64] from forward(logits, target, class_weight); a loss must return the batch mean: "
                          "a float scalar (shape []) differentiable w.r.t. the logits"),
    ({"train.sampler": "pastend"}, "samplers plugin 'pastend' (breakplug, sampmod:build_past_end) returned indices "
                                   "1..{n}, outside 0..{last} from indices() for epoch 1; a sampler must return "
                                   "positions 0..{last} of the {n} training images as a 1-D int64 (or int32) tensor"),
    ({"train.sampler": "floaty"}, "samplers plugin 'floaty' (breakplug, sampmod:build_floats) returned a float32 "
                                  "tensor of shape [{n}] from indices() for epoch 1; a sampler must return "
                                  "positions 0..{last} of the {n} training images as a 1-D int64 (or int32) tensor"),
])
def test_a_loss_or_sampler_that_breaks_its_contract_is_one_line_before_any_checkpoint(
        contract_breakers, tmp_path, default_params, settings, message):
    """A loss returning a per-sample vector crashed pretrain after training started ("grad can be implicitly
    created only for scalar outputs"), and a sampler's out-of-range positions gave an IndexError traceback.
    Both are now checked where they are used (Trainer.loss on every call, engine.contract.sample_order on every
    draw): one line naming the plugin and what it returned, before any update or checkpoint."""
    from pipeline.errors import LongtailError

    p, ds = prepare(tmp_path, tiny_pretrain_finetune(default_params))
    p = parse(override(p.raw, settings))
    n = sum(training.load_dataset(ds).class_counts)
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    with pytest.raises(LongtailError) as err:
        training.run("pretrain", p, **files)
    assert str(err.value) == message.format(n=n, last=n - 1)
    assert not (tmp_path / "pre.pt").exists() and not list((tmp_path / "r").glob("*"))
