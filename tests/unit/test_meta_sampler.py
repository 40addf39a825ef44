"""Balanced Meta-Softmax's meta sampler (Ren et al., NeurIPS 2020)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testkit import named_method_params, project_params, tiny_two_stage
from testkit.twostage import RecordingLog, assert_same, backbone_state, prepare, pretrained_context

from pipeline.errors import LongtailError
from pipeline.methods.meta_sampler import (BatchNormReplay, MetaSamplerTraining, SampleRates, build_meta_sampler,
                                           stage_two_epochs)

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


def meta_training(x, y, clf, seed=0, **kw):
    args = dict(epochs=10, steps_per_epoch=len(y) // 64, lr=0.05, batch_size=64, meta_batch_size=64, momentum=0.9,
                weight_decay=5e-4, meta_lr=0.03, temperature=1.0, init_pow=0.0) | kw
    return MetaSamplerTraining(clf, lambda idx: x[idx], y, COUNTS, torch.Generator().manual_seed(seed), **args)


def run_epoch(tr, i):
    """One epoch of the steps, stepped as the trainer does."""
    for group in tr.opt.param_groups:
        group["lr"] = tr.lr(i)
    for b in tr.batches(i):
        out = tr.loss(b)
        tr.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        tr.opt.step()


def test_the_learned_class_rates_move_towards_the_tail():
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf)
    start = tr.sampler.class_probabilities()
    assert torch.allclose(start, torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS))  # instance-balanced
    for i in range(10):
        run_epoch(tr, i)
    end = tr.sampler.class_probabilities()
    assert end[0] < start[0] - 0.02, (start, end)  # the head is drawn less
    assert end[3] > start[3] and end[4] > start[4], (start, end)  # the two rarest classes more
    assert end[2:].sum() > start[2:].sum() + 0.05, (start, end)
    # and the re-trained classifier is more balanced than the CE-fitted one: class 3 (recall 0.32
    # under CE) gains the most, and the mean recall rises
    _, _, start_clf = toy_problem()
    before, after = recall(start_clf, x, y), recall(clf, x, y)
    assert (after - before).argmax().item() == 3 and after[3] > before[3] + 0.2, (before, after)
    assert after.mean() > before.mean() + 0.03, (before, after)


def recall(clf, x, y):
    pred = clf(x).argmax(1)
    return torch.stack([(pred[y == j] == j).float().mean() for j in range(len(COUNTS))])


class OneClass:
    """A meta sampler (samplers.Sampler's `indices`) that only ever gives images of class `j`."""

    def __init__(self, j):
        self.j = j

    def indices(self, labels, epoch, epochs, generator):
        return torch.nonzero(labels == self.j).flatten()


def test_a_meta_batch_of_one_class_pulls_its_rate_up_the_most():
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf, meta_sampler=OneClass(3))
    start = tr.sampler.class_probabilities()
    for i in range(5):
        run_epoch(tr, i)
    gain = tr.sampler.class_probabilities() / start
    assert gain.argmax().item() == 3, gain


def test_the_meta_batches_are_class_aware_one_image_per_visit():
    """Their meta loader: the class-aware sampler with one image per class visit, so each meta batch
    of 64 over 5 classes holds 12 to 14 images of every class (12 or 13 where it starts a cycle)."""
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf)
    tr.batches(0)
    assert len(tr.meta_order) == tr.steps_per_epoch * 64
    for step in range(tr.steps_per_epoch):
        counts = torch.bincount(y[tr.meta_order[step * 64:(step + 1) * 64]], minlength=5).tolist()
        assert min(counts) >= 12 and max(counts) <= 14, counts
        if step == 0:
            assert sorted(counts) == [12, 13, 13, 13, 13]


def test_each_step_feeds_its_own_meta_slice_after_the_drawn_batch():
    x, y, clf = toy_problem()
    seen = []
    tr = meta_training(x, y, clf)
    tr.features = lambda idx: seen.append(idx.clone()) or x[idx]
    for b in tr.batches(0):
        tr.loss(b)
    assert len(seen) == 2 * tr.steps_per_epoch
    for step in range(tr.steps_per_epoch):
        assert len(seen[2 * step]) == 64  # the drawn batch
        assert torch.equal(seen[2 * step + 1], tr.meta_order[step * 64:(step + 1) * 64])


@pytest.mark.parametrize("warm", [False, True])
def test_the_meta_gradient_equals_a_hand_derived_one(warm):
    """d meta-loss / d w by hand for a linear classifier: Balanced Softmax in the weighted virtual
    step (SGD with weight decay, and the momentum buffer once there is one), plain CE on the meta
    batch, chained through the weights' d s / d w. Before any real step (no buffer) and after."""
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf, lr=0.2, weight_decay=0.01)
    if warm:
        run_epoch(tr, 0)
    lr = tr.opt.param_groups[0]["lr"] = 0.2
    idx, meta_idx = torch.arange(0, 645, 40), torch.arange(3, 645, 61)
    f, yb, fm, ym = x[idx], y[idx], x[meta_idx], y[meta_idx]
    w0 = tr.sampler.w.detach().clone()  # the meta step's Adam update moves w
    s = 0.3 * torch.sigmoid(tr.sampler.w)[yb]
    tr.meta_step(f, yb, 1 - s.detach() + s, meta_idx)
    got = tr.sampler.w.grad.clone()
    # by hand, in float64
    d = lambda t: t.detach().double()  # noqa: E731
    W, b, f, fm = d(clf.weight), d(clf.bias), d(f), d(fm)
    n, B, M, C = torch.tensor(COUNTS, dtype=torch.float64), len(yb), len(ym), len(COUNTS)
    e = torch.eye(C, dtype=torch.float64)
    r = torch.softmax(f @ W.T + b + n.log(), 1) - e[yb]  # Balanced Softmax residuals [B, C]
    GW, Gb = r[:, :, None] * f[:, None, :] / B, r / B  # each sample's gradient (weight 1)
    stepW, stepb = GW.sum(0) + 0.01 * W, Gb.sum(0) + 0.01 * b
    if warm:
        stepW = stepW + 0.9 * d(tr.opt.state[clf.weight]["momentum_buffer"])
        stepb = stepb + 0.9 * d(tr.opt.state[clf.bias]["momentum_buffer"])
    W2, b2 = W - lr * stepW, b - lr * stepb
    q = torch.softmax(fm @ W2.T + b2, 1) - e[ym]  # plain CE on the meta batch
    dW2, db2 = q.T @ fm / M, q.sum(0) / M
    da = -lr * ((GW * dW2).sum((1, 2)) + (Gb * db2).sum(1))  # d meta / d weight_b
    sig = torch.sigmoid(d(w0))
    expected = torch.zeros(C, dtype=torch.float64).index_add_(0, yb, da * 0.3 * sig[yb] * (1 - sig[yb]))
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-9), (got, expected)
    assert expected.abs().max() > 1e-6


def test_initial_rates_follow_init_pow():
    """rate_c = p_c^-pow / (min + max): 1/2 everywhere at pow 0 (instance-balanced draws); at pow 1
    every class is drawn equally often."""
    y = torch.cat([torch.full((n,), j) for j, n in enumerate(COUNTS)])
    flat = SampleRates(COUNTS, y, init_pow=0.0)
    assert torch.equal(flat.w.detach(), torch.zeros(5))
    assert torch.allclose(flat.rates(), torch.full((5,), 0.5))
    balanced = SampleRates(COUNTS, y, init_pow=1.0)
    assert torch.allclose(balanced.class_probabilities(), torch.full((5,), 0.2), atol=1e-6)
    # by hand: p = n / 645, 1/p normalised by (1/p_min + 1/p_max) = 645/10 + 645/400 -> 1/p_400 / that
    assert balanced.rates()[0].item() == pytest.approx((645 / 400) / (645 / 10 + 645 / 400), rel=1e-6)


def test_the_straight_through_sample_has_value_one_and_the_soft_samples_gradient():
    """Drawn images follow the rates, and the weight's gradient is that of the soft sample at the
    drawn image, d softmax(log r_y + g)_i / d w, computed here by hand."""
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    rates = SampleRates([2, 1, 3], y)
    with torch.no_grad():
        rates.w.copy_(torch.tensor([0.5, -1.0, 0.2]))
    idx, weight = rates.sample(1, torch.Generator().manual_seed(3))
    assert weight.item() == pytest.approx(1.0)
    weight.sum().backward()
    # the same Gumbel noise, and the gradient by hand
    u = torch.rand(1, 6, generator=torch.Generator().manual_seed(3)).clamp_(1e-10, 1 - 1e-7)
    g = -torch.log(-torch.log(u))[0]
    sig = torch.sigmoid(torch.tensor([0.5, -1.0, 0.2]))
    score = sig.log()[y] + g
    i = int(score.argmax())
    assert idx.item() == i
    soft = torch.softmax(score, 0)
    # d soft_i / d w_c = soft_i (1 - sigmoid(w_c)) ([y_i = c] - sum_{j: y_j = c} soft_j)
    by_hand = torch.tensor([soft[i] * (1 - sig[c]) * (float(y[i] == c) - soft[y == c].sum()) for c in range(3)])
    assert torch.allclose(rates.w.grad, by_hand, atol=1e-6)
    # and the draws follow the rates: image i is drawn with probability sigmoid(w_y) / sum
    idx, _ = rates.sample(30000, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=6).float() / 30000
    assert torch.allclose(freq, sig[y] / sig[y].sum(), atol=0.01)


def test_the_virtual_step_is_the_real_optimizers_step():
    """With a momentum buffer and weight decay in play, the virtual parameters equal what
    torch.optim.SGD's own step gives on the same loss."""
    x, y, clf = toy_problem()
    tr = meta_training(x, y, clf, lr=0.3, weight_decay=0.01)
    run_epoch(tr, 0)  # fills the momentum buffers
    loss = F.cross_entropy(clf(x[:40]), y[:40])
    virtual = {k: v.detach() for k, v in tr._virtual_step(loss).items()}
    twin, opt = copy.deepcopy(clf), None
    opt = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.9, weight_decay=0.01)
    opt.load_state_dict(tr.opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(twin(x[:40]), y[:40]).backward()
    opt.step()
    for k, v in twin.named_parameters():
        assert torch.allclose(virtual[k], v.detach(), atol=1e-6), k
        assert not torch.allclose(virtual[k], dict(clf.named_parameters())[k].detach())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_replay_equals_a_second_forward_pass(momentum):
    """Their real step runs the backbone on the virtual step's batch again; the replay gives the
    same running statistics as that second pass, also after another batch in between."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=momentum)).train()
    a, b = torch.randn(16, 3, 8, 8) * 2 + 1, torch.randn(16, 3, 8, 8)
    twice = copy.deepcopy(net)
    with torch.no_grad():
        for batch in (a, b, a):
            twice(batch)
        replay = BatchNormReplay(net)
        with replay.recording():
            net(a)
        net(b)
        replay.apply()
    for k, v in twice.state_dict().items():
        assert torch.allclose(net.state_dict()[k].float(), v.float(), atol=1e-5), k


def test_the_stage_runs_whole_epochs_of_their_length():
    """Their CIFAR-10-LT r = 100 stage: 2,000 steps at batch 512 = 84 epochs of 24 steps."""
    assert stage_two_epochs(2000, 12406, 512) == (84, 24)
    assert stage_two_epochs(3, 300, 512) == (3, 1)  # a batch larger than the set: one step per epoch


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("classifier.")}


def test_the_strategy_keeps_the_backbone_and_records_the_rates(tmp_path):
    """The authors' classifier stage: frozen backbone weights, but train-mode BatchNorm on augmented
    batches (running statistics follow the sampled data; three updates per step, as their virtual,
    meta and real forward passes), and a fresh classifier."""
    raw = tiny_two_stage(project_params(), loss="balanced_softmax")
    p, ds = prepare(tmp_path, raw)
    ctx = pretrained_context(p, ds, RecordingLog())
    model = ctx.trainer.model
    weights, before = _weights(model), backbone_state(model)
    w0 = model.classifier.weight.detach().clone()
    calls = []
    n = len(ctx.trainer.data.y_train)
    epochs, steps = stage_two_epochs(4 * (n // 32), n, 32)
    assert (epochs, steps) == (4, n // 32) and steps >= 2
    strategy = build_meta_sampler(iterations=4 * steps, batch_size=32, meta_batch_size=20)
    import pipeline.methods.meta_sampler as ms

    real = ms.extract_features

    def counting(t, idx=None, augmented=False, train_mode=False, whole_batch=False):
        calls.append((idx is None, augmented, train_mode, whole_batch, len(idx)))
        return real(t, idx, augmented, train_mode, whole_batch)

    ms.extract_features = counting
    try:
        strategy.run(ctx)
    finally:
        ms.extract_features = real
    assert_same(weights, _weights(model))
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and any(not torch.equal(before[k], model.state_dict()[k]) for k in bn)  # train-mode BatchNorm
    tracked = [k for k in before if k.endswith("num_batches_tracked")]
    assert all(model.state_dict()[k] - before[k] == 3 * epochs * steps for k in tracked)
    # fresh augmented train-mode features of whole batches: a training batch then a meta batch per step
    assert [c[:4] for c in calls] == [(False, True, True, True)] * (2 * epochs * steps)
    assert [c[4] for c in calls] == [32, 20] * (epochs * steps)
    # the classifier was re-initialised (far from the stage-1 one) and then trained
    assert not torch.equal(model.classifier.weight.detach(), w0)
    assert torch.nn.functional.cosine_similarity(model.classifier.weight.detach().flatten(), w0.flatten(), 0) < 0.9
    rates = ctx.meta["meta_sampler_rates"]
    assert len(rates) == 10 and sum(rates) == pytest.approx(1.0)
    assert [r["epoch"] for r in ctx.trainer.history[-4:]] == [2, 3, 4, 5] and ctx.trainer.epoch == 6
    assert {"sampler_rate/009", "meta_loss", "test_acc"} <= ctx.log.keys()


def test_fixed_features_recipe_keeps_the_whole_backbone(tmp_path):
    """augment: false, bn: eval computes the features once, and nothing in the backbone changes."""
    raw = tiny_two_stage(project_params(), loss="balanced_softmax")
    p, ds = prepare(tmp_path, raw)
    ctx = pretrained_context(p, ds, RecordingLog())
    before = backbone_state(ctx.trainer.model)
    build_meta_sampler(iterations=2, batch_size=64, augment=False, bn="eval", reinit=False).run(ctx)
    assert_same(before, backbone_state(ctx.trainer.model))


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.meta_lr"):
        build_meta_sampler(meta_lr=0)
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.init_pow must be a finite number, got nan"):
        build_meta_sampler(init_pow=float("nan"))
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.iterations must be >= 1, got 0"):
        build_meta_sampler(iterations=0)
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.meta_batch_size must be an integer"):
        build_meta_sampler(meta_batch_size=1.5)
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.bn must be one of train, eval"):
        build_meta_sampler(bn="frozen")
    with pytest.raises(LongtailError, match="finetunes.meta_sampler.augment"):
        build_meta_sampler(augment="yes")


def test_the_named_method_balms_trains_stage_one_with_plain_softmax():
    """The authors' recipe: stage 1 is softmax CE; Balanced Softmax acts only in the classifier stage."""
    balms = named_method_params("BALMS")
    assert balms["loss"] == "ce"
    assert balms["finetune.strategy"] == "meta_sampler" and balms["finetune.start_epoch"] == 200
