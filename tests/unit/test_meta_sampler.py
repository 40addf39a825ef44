"""Balanced Meta-Softmax's meta sampler (Ren et al., NeurIPS 2020)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testkit import named_method_params, project_params, tiny_two_stage
from testkit.twostage import RecordingLog, assert_same, backbone_state, prepare, pretrained_context

from pipeline.errors import LongtailError
from pipeline.methods.decoupling import balanced_subset
from pipeline.methods.meta_sampler import ClassSampler, MetaSamplerTraining, build_meta_sampler

COUNTS = [400, 150, 60, 25, 10]


def toy_problem(seed=0):
    """Gaussian classes in 8-d with a long-tailed count profile, and a linear classifier fitted to
    them with plain CE (so it is biased towards the head). A fresh classifier on every call."""
    x, y, state = _toy(seed)
    clf = nn.Linear(8, len(COUNTS))
    clf.load_state_dict(state)
    return x, y, clf


@functools.lru_cache
def _toy(seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(len(COUNTS), 8, generator=g) * 1.2
    x = torch.cat([means[j] + torch.randn(n, 8, generator=g) for j, n in enumerate(COUNTS)])
    y = torch.cat([torch.full((n,), j) for j, n in enumerate(COUNTS)])
    torch.manual_seed(seed)
    clf = nn.Linear(8, len(COUNTS))
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(clf(x), y).backward()
        opt.step()
    return x, y, {k: v.detach().clone() for k, v in clf.state_dict().items()}


def meta_training(x, y, clf, meta_idx, seed=0, **kw):
    args = dict(epochs=10, lr=0.05, batch_size=64, momentum=0.9, weight_decay=5e-4, meta_lr=0.03,
                temperature=1.0, init="instance") | kw
    return MetaSamplerTraining(clf, lambda idx: x[idx], y, lambda: x[meta_idx], y[meta_idx], COUNTS,
                               torch.Generator().manual_seed(seed), **args)


def run_epoch(tr, i):
    """One epoch of the steps, stepped as the trainer does."""
    tr.lr(i)
    for b in tr.batches(i):
        out = tr.loss(b)
        tr.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        tr.opt.step()


def test_the_learned_class_rates_move_towards_the_tail():
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf, balanced_subset(y, 10, seed=0))
    start = tr.sampler.rates()
    assert torch.allclose(start, torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS))  # instance-balanced
    for i in range(10):
        run_epoch(tr, i)
    end = tr.sampler.rates()
    assert end[0] < start[0] - 0.02, (start, end)  # the head is drawn less
    assert end[3] > start[3] and end[4] > start[4], (start, end)  # the two rarest classes more
    assert end[2:].sum() > start[2:].sum() + 0.05, (start, end)
    # and the classifier got better on the balanced meta set's classes
    pred = clf(x).argmax(1)
    per_class = torch.stack([(pred[y == j] == j).float().mean() for j in range(len(COUNTS))])
    assert per_class[4] > 0


def test_a_meta_set_of_one_class_pulls_its_rate_up_the_most():
    x, y, clf = toy_problem()
    only_tail = torch.nonzero(y == 3).flatten()
    tr = meta_training(x, y, clf, only_tail)
    start = tr.sampler.rates()
    for i in range(5):
        run_epoch(tr, i)
    gain = tr.sampler.rates() / start
    assert gain.argmax().item() == 3, gain


def test_straight_through_gumbel_samples_pi_and_carries_gradient():
    s = ClassSampler([50, 30, 15, 5])
    g = torch.Generator().manual_seed(0)
    cls, weight = s.sample_straight_through(20000, g, temperature=1.0)
    assert torch.equal(weight.detach(), torch.ones(20000))  # forward value: a hard one-hot pick
    freq = torch.bincount(cls, minlength=4).float() / len(cls)
    assert torch.allclose(freq, s.rates(), atol=0.01)  # Gumbel-max draws samples of softmax(phi)
    (weight * torch.arange(20000.0)).sum().backward()
    assert s.phi.grad is not None and s.phi.grad.abs().sum() > 0


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("classifier.")}


def test_the_strategy_keeps_the_backbone_and_records_the_rates(tmp_path):
    """The authors' classifier stage: frozen backbone weights, but train-mode BatchNorm on augmented
    batches (running statistics follow the re-sampled data), and a fresh classifier."""
    raw = tiny_two_stage(project_params(), loss="balanced_softmax")
    p, ds = prepare(tmp_path, raw)
    ctx = pretrained_context(p, ds, RecordingLog())
    model = ctx.trainer.model
    weights, before = _weights(model), backbone_state(model)
    w0 = model.classifier.weight.detach().clone()
    calls = []
    strategy = build_meta_sampler(epochs=2)
    import pipeline.methods.meta_sampler as ms

    real = ms.extract_features

    def counting(t, idx=None, augmented=False, train_mode=False, whole_batch=False):
        calls.append((idx is None, augmented, train_mode))
        return real(t, idx, augmented, train_mode, whole_batch)

    ms.extract_features = counting
    try:
        strategy.run(ctx)
    finally:
        ms.extract_features = real
    assert_same(weights, _weights(model))
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and any(not torch.equal(before[k], model.state_dict()[k]) for k in bn)  # train-mode BatchNorm
    # fresh augmented train-mode features for every batch and meta set, never a precomputed bank
    assert calls and all(c == (False, True, True) for c in calls)
    assert len(calls) >= 2 * 2 * 2  # 2 epochs x >= 2 batches x (virtual + meta + real)
    # the classifier was re-initialised (far from the stage-1 one) and then trained
    assert not torch.equal(model.classifier.weight.detach(), w0)
    assert torch.nn.functional.cosine_similarity(model.classifier.weight.detach().flatten(), w0.flatten(), 0) < 0.9
    rates = ctx.meta["meta_sampler_rates"]
    assert len(rates) == 10 and sum(rates) == pytest.approx(1.0)
    assert [r["epoch"] for r in ctx.trainer.history[-2:]] == [2, 3] and ctx.trainer.epoch == 4
    assert {"sampler_rate/009", "meta_loss", "test_acc"} <= ctx.log.keys()


def test_fixed_features_recipe_keeps_the_whole_backbone(tmp_path):
    """augment: false, bn: eval computes the features once, and nothing in the backbone changes."""
    raw = tiny_two_stage(project_params(), loss="balanced_softmax")
    p, ds = prepare(tmp_path, raw)
    ctx = pretrained_context(p, ds, RecordingLog())
    before = backbone_state(ctx.trainer.model)
    build_meta_sampler(epochs=2, augment=False, bn="eval", reinit=False).run(ctx)
    assert_same(before, backbone_state(ctx.trainer.model))


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.meta_lr"):
        build_meta_sampler(meta_lr=0)
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.init"):
        build_meta_sampler(init="uniform")
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.bn must be one of train, eval"):
        build_meta_sampler(bn="frozen")
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.augment"):
        build_meta_sampler(augment="yes")


def test_the_named_method_balms_trains_stage_one_with_plain_softmax():
    """The authors' recipe: stage 1 is softmax CE; Balanced Softmax acts only in the classifier stage."""
    balms = named_method_params("BALMS")
    assert balms["loss"] == "ce"
    assert balms["finetune.strategy"] == "meta_sampler" and balms["finetune.start_epoch"] == 200
