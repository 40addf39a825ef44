"""The evaluate stage's outputs (metrics/eval.json, the plots/ files DVC tracks) appear as one set or
not at all: an interrupted or failed evaluate leaves the previous set whole."""

import json
from pathlib import Path

import pytest

from testkit import project_params, tiny_pretrain_finetune
from testkit.twostage import prepare

from pipeline import figures, io
from pipeline.errors import LongtailError
from pipeline.stages import evaluate, training

PLOTS = ["acc_vs_count.png", "confusion.csv", "confusion.png", "curves.png", "history.csv", "margins.csv",
         "margins.png", "per_class.csv", "per_class.png"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(params, dataset, final.pt): a freshly set-up model saved as the finetune stage saves it, with one
    made-up epoch of history (training it would only cost time here)."""
    tmp = tmp_path_factory.mktemp("trained")
    p, ds = prepare(tmp, tiny_pretrain_finetune(project_params()))
    trainer, meta = training.setup(p, ds)
    trainer.epoch, trainer.history = 1, [{"epoch": 0, "lr": 0.1, "train_loss": 2.0, "train_acc": 0.2, "test_acc": 0.1}]
    io.save_torch(tmp / "final.pt", {**trainer.state_dict(), "fingerprint": training._fingerprint("finetune", p, ds),
                                     "inputs": training._inputs("finetune", p), "meta": meta})
    return p, ds, tmp / "final.pt"


@pytest.fixture
def quick(monkeypatch):
    """Made-up logits and the figures as a few bytes each: the numbers and the drawing are tested
    elsewhere; here only the set of files matters."""
    import torch

    monkeypatch.setattr(evaluate, "batched", lambda fn, x, *args, **kwargs: torch.eye(10)[torch.arange(len(x)) % 10])

    def figure(name):
        def draw(*args, **kwargs):
            path = next(a for a in (*args, *kwargs.values()) if isinstance(a, Path))
            with io.atomic_path(path) as tmp:
                tmp.write_bytes(b"png " + name.encode())
        return draw

    for name in ("curves", "per_class", "confusion", "acc_vs_count", "margins"):
        monkeypatch.setattr(figures, name, figure(name))


class Log:
    """An MLflow stand-in whose artifact store fails at the n-th artifact (tracking.StageRun raises
    LongtailError for an OSError there)."""

    parent = None

    def __init__(self, fail_at: int):
        self.fail_at, self.artifacts = fail_at, []

    def log_metrics(self, metrics, step=None):
        pass

    def log_table(self, columns, artifact_file):
        pass

    def log_artifact(self, path, artifact_path=None):
        if len(self.artifacts) + 1 == self.fail_at:
            raise LongtailError("cannot write the artifact evaluation/history.csv to the MLflow artifact store ...")
        self.artifacts.append(path.name)


def _outputs(root):
    """Every file and folder under root, as relative paths: the staging folders would show here."""
    return sorted(str(f.relative_to(root)) for f in root.rglob("*"))


def _interrupted(monkeypatch):
    def margins(*args, **kwargs):  # the last writer: Ctrl-C arrives after everything else is written
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "margins", margins)


def test_an_interrupted_or_failed_evaluate_leaves_the_previous_outputs_whole(trained, quick, tmp_path, monkeypatch):
    """Ctrl-C as eval.json appeared left eval.json and three of the CSVs, no figures and no margins.csv;
    evaluating again put a new eval.json beside the previous run's figures."""
    p, ds, final = trained
    metrics, plots = tmp_path / "metrics" / "eval.json", tmp_path / "plots"
    files = dict(dataset=ds, final=final, metrics=metrics, plots=plots)
    with monkeypatch.context() as m:
        _interrupted(m)
        with pytest.raises(KeyboardInterrupt):
            evaluate.run(p, **files)
    assert _outputs(tmp_path) == ["metrics"]  # nothing: no eval.json, no plots, no staging folders

    log = Log(fail_at=0)
    evaluate.run(p, log=log, **files)
    assert _outputs(tmp_path) == ["metrics", "metrics/eval.json", "plots", *(f"plots/{f}" for f in PLOTS)]
    assert log.artifacts == ["eval.json", *PLOTS]
    previous = {f: f"previous {f}".encode() for f in ["metrics/eval.json", *(f"plots/{f}" for f in PLOTS)]}
    for f, data in previous.items():
        (tmp_path / f).write_bytes(data)
    (plots / "notes.txt").write_text("mine")  # not an output of the stage: left alone

    with monkeypatch.context() as m:
        _interrupted(m)
        with pytest.raises(KeyboardInterrupt):
            evaluate.run(p, **files)
    with pytest.raises(LongtailError, match="cannot write the artifact"):  # logging fails: the stage fails
        evaluate.run(p, log=Log(fail_at=3), **files)
    assert {f: (tmp_path / f).read_bytes() for f in previous} == previous
    assert _outputs(tmp_path) == sorted([*previous, "metrics", "plots", "plots/notes.txt"])

    result = evaluate.run(p, **files)
    assert json.loads(metrics.read_text()) == result
    assert all((tmp_path / f).read_bytes() != data for f, data in previous.items())
    assert (plots / "notes.txt").read_text() == "mine"


def test_a_ctrl_c_during_the_swap_is_raised_after_it(tmp_path, monkeypatch):
    """Once the new set is complete, moving it in runs whole (interrupts.shielded): a Ctrl-C arriving
    between two of the moves is raised after the last one, so no mix of old and new files is left."""
    import os
    import signal

    from pipeline import interrupts

    signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist workers start with SIGINT ignored
    interrupts.install()  # tests/conftest.py puts the worker's handlers back
    plots, last = tmp_path / "plots", tmp_path / "metrics" / "eval.json"
    for f in (plots / "a.csv", plots / "b.csv", last):
        f.parent.mkdir(exist_ok=True)
        f.write_text("old")
    replace, sent = os.replace, []

    def ctrl_c_then_replace(src, dst):
        if not sent:  # one Ctrl-C, at the first move (a second one would not wait: interrupts._handle)
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        replace(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with io.atomic_outputs(plots, last) as (out, staged_last):
            for f in (out / "a.csv", out / "b.csv", staged_last):
                f.write_text("new")
            monkeypatch.setattr(io.os, "replace", ctrl_c_then_replace)
    monkeypatch.undo()
    assert {str(f.relative_to(tmp_path)): f.read_text() for f in tmp_path.rglob("*") if f.is_file()} == {
        "plots/a.csv": "new", "plots/b.csv": "new", "metrics/eval.json": "new"}
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_dir()) == ["metrics", "plots"]


def test_one_pass_over_the_test_set_when_the_best_weights_are_the_final_ones(trained, tmp_path, monkeypatch):
    """The best epoch's weights equal the final ones (the best epoch was the last): evaluate scores the
    test set once, and reports the same numbers for both. Other best weights get their own pass."""
    import torch

    p, ds, final = trained
    state = io.load_checkpoint(final)
    calls, real = [], evaluate.batched
    monkeypatch.setattr(evaluate, "batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    files = dict(dataset=ds, metrics=tmp_path / "eval.json", plots=tmp_path / "plots")

    same = tmp_path / "same.pt"
    io.save_torch(same, {**state, "best": {"epoch": 0, "model": {k: v.clone() for k, v in state["model"].items()}}})
    result = evaluate.run(p, final=same, **files)
    assert len(calls) == 1
    assert {k: v for k, v in result["best"].items() if k != "epoch"} == \
        {k: v for k, v in result["final"].items() if k != "epoch"}

    calls.clear()
    other = tmp_path / "other.pt"
    weights = {k: v.clone() for k, v in state["model"].items()}
    weights["classifier.weight"] = torch.zeros_like(weights["classifier.weight"])
    weights["classifier.weight"][3] = 1.0  # class 3 wins for every image (pooled features are >= 0 after ReLU)
    weights["classifier.bias"] = torch.zeros_like(weights["classifier.bias"])
    io.save_torch(other, {**state, "best": {"epoch": 0, "model": weights}})
    evaluate.run(p, final=other, **files)
    assert len(calls) == 2
    rows = (tmp_path / "plots" / "per_class.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[-1]) for r in rows] == [1.0 if c == 3 else 0.0 for c in range(10)]
