"""Every training stage 2 resumes bit for bit after a kill: cRT, LWS, BALMS (meta_sampler) and BBN
hand the trainer their steps (engine.contract.Steps), so the trainer's checkpoints cover them."""

import copy

import pytest

from testkit import project_params, tiny_two_stage
from testkit.twostage import assert_same, prepare, pretrained_context

from pipeline.methods import decoupling as dc
from pipeline.methods.bbn import build_bbn
from pipeline.methods.meta_sampler import build_meta_sampler
from pipeline.stages import training


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("resume"), tiny_two_stage(project_params()))


@pytest.fixture(scope="module")
def prepared_bbn(tmp_path_factory):
    raw = tiny_two_stage(project_params(), epochs=3)
    raw["model"] = {"arch": "bbn_resnet32"}
    raw["finetune"].update(strategy="bbn", start_epoch=0)
    return prepare(tmp_path_factory.mktemp("resume_bbn"), raw)


def bbn_context(p, ds):
    trainer, meta = training.setup(p, ds)
    return training.FinetuneContext(p, trainer, meta, p.train.epochs, {}, None)


def killed_after_first_checkpoint(make_ctx, build):
    """Run stage 2 until its first checkpoint, then 'kill' it; return that checkpoint."""
    ctx, saved = make_ctx(), []

    def save(state):
        saved.append(copy.deepcopy(state))
        raise Killed

    ctx.fit_kwargs = {"save": save, "checkpoint_every": 1}
    with pytest.raises(Killed):
        build().run(ctx)
    return saved[0]


def check_resumes_exactly(make_ctx, build):
    whole = make_ctx()
    build().run(whole)
    state = killed_after_first_checkpoint(make_ctx, build)
    assert state["epoch"] < whole.trainer.epoch  # it really stopped early
    resumed = make_ctx()
    resumed.resume = lambda: resumed.trainer.load_state_dict(copy.deepcopy(state))
    build().run(resumed)
    a, b = whole.trainer, resumed.trainer
    assert a.epoch == b.epoch
    assert [r.get("test_acc") for r in a.history] == [r.get("test_acc") for r in b.history]
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert_same(a.model.state_dict(), b.model.state_dict())
    assert a.best["epoch"] == b.best["epoch"]


@pytest.mark.parametrize("name", ["crt", "lws", "meta_sampler"])
def test_classifier_stage_two_resumes_exactly(prepared, name):
    p, ds = prepared
    build = {"crt": lambda: dc.build_crt(epochs=3), "lws": lambda: dc.build_lws(epochs=3, lr=0.5),
             "meta_sampler": lambda: build_meta_sampler(iterations=3, batch_size=4096, meta_batch_size=64)}[name]
    check_resumes_exactly(lambda: pretrained_context(p, ds), build)


def test_bbn_resumes_exactly(prepared_bbn):
    p, ds = prepared_bbn
    check_resumes_exactly(lambda: bbn_context(p, ds), build_bbn)
