"""The training tests' helpers: a tiny prepared dataset, a trainer pretrained on it for the two-stage
method tests (wrapped in a FinetuneContext), a recording MLflow stand-in, and state comparisons."""

from __future__ import annotations

import copy

import torch

from pipeline.params import parse
from pipeline.stages import build_dataset, training


class RecordingLog:
    """Stands in for the MLflow handle (tracking.StageRun): keeps what a stage or a strategy logs."""

    def __init__(self):
        self.metrics, self.artifacts, self.tags, self.params = [], [], {}, {}
        self.ended = []  # the killed runs a resumed stage ended (tracking.StageRun.end_killed)

    parent = None

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_epoch(self, row, **extra):  # as tracking.StageRun: step = epoch number from 1
        self.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, **extra}, step=row["epoch"] + 1)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_params(self, params):
        self.params.update(params)

    def end_killed(self, run_id):
        self.ended.append(run_id)

    def keys(self) -> set:
        return {k for m, _ in self.metrics for k in m}

    def steps(self, key: str) -> list:
        """The steps at which `key` was logged, in order."""
        return [step for m, step in self.metrics if key in m]


def prepare(tmp_path, raw: dict):
    """(params, dataset.npz) built from raw under tmp_path/prepared."""
    p = parse(raw)
    build_dataset.run(p, out_dir=tmp_path / "prepared")
    return p, tmp_path / "prepared" / "dataset.npz"


_PRETRAINED: dict = {}


def pretrained_context(p, dataset, log=None):
    """A trainer set up from params and trained over the whole schedule (stage 1), in a context whose
    `until` is the stage-1 end, as the finetune stage builds it for a decoupling strategy. Stage 1
    runs once per (params, dataset); later calls get a fresh trainer loaded from its checkpoint."""
    trainer, meta = training.setup(p, dataset)
    key = (repr(sorted(p.raw.items(), key=str)), str(dataset))
    if key not in _PRETRAINED:
        trainer.fit(p.train.epochs)
        _PRETRAINED[key] = copy.deepcopy(trainer.state_dict())
    else:
        trainer.load_state_dict(copy.deepcopy(_PRETRAINED[key]))
    return training.FinetuneContext(p, trainer, meta, p.train.epochs, {}, log)


def backbone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def assert_same(a: dict, b: dict):
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
