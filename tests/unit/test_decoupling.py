"""Decoupling (Kang et al., ICLR 2020): cRT, tau-normalisation (+ its sweep), LWS, NCM."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from testkit import project_params, tiny_two_stage
from testkit.twostage import RecordingLog, assert_same, backbone_state, prepare, pretrained_context

from pipeline import registry
from pipeline.errors import LongtailError
from pipeline.methods import classifier_stage as cs
from pipeline.methods import decoupling as dc
from pipeline.models.heads import make_head

ROW_KEYS = {"epoch", "lr", "train_loss", "train_acc", "images_per_s", "epoch_seconds", "reweighted"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("decoupling"), tiny_two_stage(project_params()))


@pytest.fixture
def ctx(prepared):
    p, ds = prepared
    return pretrained_context(p, ds, RecordingLog())


def weights(model) -> dict:
    """The backbone's parameters (no BatchNorm buffers)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("classifier.")}


def bn_stats(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running_" in k}


def rebuilt(ctx):
    """The model as the evaluate stage rebuilds it from the checkpoint meta."""
    m = registry.build("models", ctx.meta["arch"], len(ctx.meta["class_counts"]), ctx.meta["in_channels"],
                       ctx.meta["head"], params=ctx.meta["model_params"])
    m.load_state_dict(ctx.trainer.model.state_dict())
    return m.eval()


# -- tau-normalisation ----------------------------------------------------------------------------

def test_tau_normalize_against_hand_computed_values():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])  # row norms 5, 2, 1
    assert torch.allclose(dc.tau_normalize(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(dc.tau_normalize(w, 0.5),
                          torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, math.sqrt(2)], [1.0, 0.0]]))
    assert torch.equal(dc.tau_normalize(w, 0.0), w)
    # tau = 2: w / |w|^2
    assert torch.allclose(dc.tau_normalize(w, 2.0), torch.tensor([[0.12, 0.16], [0.0, 0.5], [1.0, 0.0]]))


def test_pick_tau_takes_the_best_and_breaks_ties_towards_larger_tau():
    sweep = [{"tau": t, "balanced_acc": a} for t, a in ((0.0, 0.5), (0.5, 0.8), (0.7, 0.8), (1.0, 0.6))]
    assert dc.pick_tau(sweep) == 0.7
    assert dc.pick_tau(sweep[:2]) == 0.5


def test_tau_norm_drops_the_bias_and_evaluate_rebuilds_the_model(ctx):
    before = backbone_state(ctx.trainer.model)
    w0 = ctx.trainer.model.classifier.weight.detach().clone()
    dc.build_tau_norm(tau=0.5, sweep_file=None).run(ctx)
    clf = ctx.trainer.model.classifier
    assert clf.bias is None and ctx.meta["head"] == "linear_nobias"
    assert torch.allclose(clf.weight, w0 / w0.norm(dim=1, keepdim=True).sqrt())
    assert_same(before, backbone_state(ctx.trainer.model))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt(ctx)(x), ctx.trainer.model.eval()(x), rtol=1e-5, atol=1e-4)  # layouts differ in rounding
    # nothing trained: best = the final model at the stage-1 end
    assert ctx.trainer.best == {"epoch": ctx.trainer.epoch - 1, "test_acc": -1.0, "model": None}
    assert ctx.meta["tau_norm"]["tau"] == 0.5


class Poison:
    """A test split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was read (.{name})")

    def __len__(self):
        raise AssertionError("the test set was read (len)")

    def __getitem__(self, item):
        raise AssertionError("the test set was read ([])")


def test_the_tau_sweep_never_touches_the_test_set(prepared, tmp_path):
    p, ds = prepared
    clean = pretrained_context(p, ds)
    poisoned = pretrained_context(p, ds, RecordingLog())
    poisoned.trainer.data.x_test, poisoned.trainer.data.y_test = Poison(), Poison()
    # the same pretrained model in both (training is deterministic)
    assert torch.equal(clean.trainer.model.classifier.weight, poisoned.trainer.model.classifier.weight)
    a = dc.build_tau_norm(tau="auto", sweep_file=None).run(clean)
    b = dc.build_tau_norm(tau="auto", sweep_file=str(tmp_path / "sweep.json")).run(poisoned)
    assert a == b
    assert [r["tau"] for r in a["sweep"]] == pytest.approx([0.1 * i for i in range(21)])
    assert a["tau"] == dc.pick_tau(a["sweep"])
    # the sweep set is a class-balanced subset of the TRAINING set: min(20, n_j) images per class
    counts = clean.meta["class_counts"]
    assert a["holdout"]["images"] == sum(min(20, n) for n in counts)
    # logged to MLflow (one step per tau) and written as json
    assert {"tau_sweep/balanced_acc", "tau_sweep/acc", "tau"} <= poisoned.log.keys()
    assert sorted(s for m, s in poisoned.log.metrics if "tau_sweep/acc" in m) == [10 * i for i in range(21)]
    assert (tmp_path / "sweep.json").exists() and poisoned.log.artifacts


def test_the_sweep_scores_the_training_subset_it_says(ctx):
    """The sweep's numbers are the accuracies of the tau-normalised classifier on the held-out
    training images, recomputed here independently."""
    t = ctx.trainer
    w = t.model.classifier.weight.detach().clone()
    idx = dc.balanced_subset(t.data.y_train_cpu, 3, seed=5)
    sweep = dc.tau_sweep(t, w, [0.0, 1.0], idx)
    t.model.eval()
    x = (t.data.x_train[idx].float() / 255 - t.data.mean.view(-1, 1, 1)) / t.data.std.view(-1, 1, 1)
    with torch.no_grad():
        f = t.model.features(x)
    y = t.data.y_train[idx]
    for r in sweep:
        pred = (f @ dc.tau_normalize(w, r["tau"]).t()).argmax(1)
        assert r["acc"] == pytest.approx((pred == y).float().mean().item())


def test_balanced_subset_is_deterministic_and_class_balanced():
    labels = torch.tensor([0] * 30 + [1] * 7 + [2] * 2)
    a = dc.balanced_subset(labels, 5, seed=3)
    assert torch.equal(a, dc.balanced_subset(labels, 5, seed=3))
    assert torch.bincount(labels[a]).tolist() == [5, 5, 2]
    assert not torch.equal(a, dc.balanced_subset(labels, 5, seed=4))


# -- LWS ------------------------------------------------------------------------------------------

def test_lws_trains_only_the_scales(ctx):
    t = ctx.trainer
    before = weights(t.model)
    w0, b0 = t.model.classifier.weight.detach().clone(), t.model.classifier.bias.detach().clone()
    keys = set(t.model.state_dict())
    lws = dc.build_lws(epochs=3, lr=0.5)
    lws.run(ctx)
    s = lws.scales
    assert not torch.allclose(s, torch.ones_like(s)), "the scales did not move"
    clf = t.model.classifier
    # the classifier is exactly the frozen one, rescaled: W' = diag(f) W, b' = f b
    assert torch.equal(clf.weight.detach(), s[:, None] * w0)
    assert torch.equal(clf.bias.detach(), s * b0)
    assert_same(before, weights(t.model))
    # the authors' LWS config: weight decay 5e-4
    assert t.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert set(t.model.state_dict()) == keys and ctx.meta["head"] == "linear"
    if t.best["model"] is not None:  # the best snapshot is folded too, so evaluate can load it
        assert set(t.best["model"]) == keys
    assert ctx.meta["lws_scales"] == pytest.approx(s.tolist())
    assert [r["epoch"] for r in t.history[-3:]] == [2, 3, 4] and t.epoch == 5
    assert ROW_KEYS <= set(t.history[-1])


def test_fold_state_is_the_scaled_classifier():
    lin = torch.nn.Linear(4, 3)
    sc = dc.ScaledClassifier(lin)
    with torch.no_grad():
        sc.scale.copy_(torch.tensor([0.5, 2.0, 3.0]))
    x = torch.randn(6, 4)
    assert torch.allclose(sc.folded()(x), sc(x), atol=1e-6)
    folded = dc.fold_state({f"classifier.{k}": v for k, v in sc.state_dict().items()} | {"conv.w": torch.ones(1)})
    assert set(folded) == {"classifier.weight", "classifier.bias", "conv.w"}


# -- cRT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("augment,bn", [(True, "train"), (False, "eval")])
def test_crt_freezes_the_backbone_and_retrains_the_classifier(prepared, augment, bn):
    p, ds = prepared
    ctx = pretrained_context(p, ds, RecordingLog())
    t = ctx.trainer
    before = backbone_state(t.model)  # conv weights and BatchNorm running stats / counters
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    w0 = t.model.classifier.weight.detach().clone()
    dc.build_crt(epochs=2, augment=augment, bn=bn).run(ctx)
    if bn == "eval":
        assert_same(before, backbone_state(t.model))
    else:  # the weights stay, the BatchNorm statistics follow the class-balanced stream
        assert_same({k: v for k, v in before.items() if k in weights(t.model)}, weights(t.model))
    assert not torch.equal(t.model.classifier.weight.detach(), w0)
    assert all(not p.requires_grad or p is t.model.classifier.weight or p is t.model.classifier.bias
               for p in t.optimizer.param_groups[0]["params"])
    assert [r["epoch"] for r in t.history[-2:]] == [2, 3] and "test_acc" in t.history[-1]
    assert ROW_KEYS <= set(t.history[-1])
    assert t.best["epoch"] in (2, 3)  # best tracking restarted at stage 2
    assert {"train_loss", "test_acc"} <= ctx.log.keys()


def test_stage_two_keeps_the_backbone_in_train_mode_by_default(prepared):
    """The authors' code: the frozen backbone stays in train mode, BatchNorm running stats update."""
    p, ds = prepared
    for build in (dc.build_crt, dc.build_lws):
        ctx = pretrained_context(p, ds)
        before = bn_stats(ctx.trainer.model)
        build(epochs=1).run(ctx)
        after = bn_stats(ctx.trainer.model)
        assert any(not torch.equal(before[k], after[k]) for k in before), build.__name__


def test_a_stage_two_epoch_is_the_authors_int_n_over_batch_size_batches(prepared):
    """The authors' code (classifier-balancing, run_networks.py) stops each epoch after
    int(N / batch_size) steps, although their class-aware sampler could give n_max x C samples: here
    N = 159 at batch 32 -> 4 full batches (128 samples); `epoch_size: balanced` gives 40 x 10 = 400."""
    p, ds = prepared
    for build, expected in ((dc.build_crt(epochs=1, batch_size=32), [32] * 4),
                            (dc.build_lws(epochs=1, batch_size=32), [32] * 4),
                            (dc.build_crt(epochs=1, batch_size=256), [256]),  # N < batch: one batch
                            (dc.build_crt(epochs=1, batch_size=32, epoch_size="balanced"), [32] * 12 + [16])):
        ctx = pretrained_context(p, ds)
        assert len(ctx.trainer.data.y_train) == 159 and max(ctx.meta["class_counts"]) == 40
        seen = []
        ctx.trainer.criterion.register_forward_hook(lambda m, args, out: seen.append(len(args[1])))
        build.run(ctx)
        assert seen == expected


def test_the_lws_and_crt_schedules_are_the_authors():
    """config/*/cls_lws.yaml: 5 epochs; cls_crt.yaml: 10 (their lr 0.2 at batch 512 -> 0.05 at 128)."""
    assert dc.build_lws().training.epochs == 5 and dc.build_crt().training.epochs == 10
    assert dc.build_lws().training.lr == dc.build_crt().training.lr == 0.05
    assert project_params()["finetunes"]["lws"]["epochs"] == 5


def test_a_new_classifier_is_initialised_as_pytorch_initialises_a_linear_layer():
    """The authors' cRT classifier is a new nn.Linear: weight and bias uniform in +-1/sqrt(d)."""
    head = cs.reinit_classifier(torch.nn.Linear(64, 10), seed=3)
    bound = 1 / 8
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.95 * bound
    assert head.bias.abs().max() <= bound
    assert head.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform: bound / sqrt(3)
    assert head.bias.abs().min() > 0  # not zeroed
    again = cs.reinit_classifier(torch.nn.Linear(64, 10), seed=3)
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_train_mode_features_normalise_the_whole_batch_at_once(prepared):
    """BatchNorm in train mode normalises with the batch's statistics: stage 2 must pass the batch
    the classifier trains on through the backbone whole, not in evaluation-size pieces."""
    p, ds = prepared
    ctx = pretrained_context(p, ds)
    t = ctx.trainer
    t.cfg = dataclasses.replace(t.cfg, eval_batch_size=7)
    idx = torch.arange(40, device=t.data.y_train.device)
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    got = cs.extract_features(t, idx, augmented=False, train_mode=True, whole_batch=True)
    t.model.load_state_dict(state)
    pieces = cs.extract_features(t, idx, augmented=False, train_mode=True)  # 7 at a time: other statistics
    t.model.load_state_dict(state)
    t.model.train(True)
    with torch.no_grad():
        x = (t.data.x_train[idx].float() / 255 - t.data.mean.view(-1, 1, 1)) / t.data.std.view(-1, 1, 1)
        whole = t.model.features(x).float()
    assert torch.allclose(got, whole, atol=1e-5) and not torch.allclose(pieces, whole, atol=1e-3)


def test_tau_is_searched_over_zero_to_two():
    assert min(dc.build_tau_norm().grid) == 0 and max(dc.build_tau_norm().grid) == 2.0
    raw = project_params()
    grid = raw["finetunes"]["tau_norm"]["grid"]
    assert min(grid) == 0 and max(grid) == 2.0 and len(grid) == 21


def test_crt_trains_on_class_aware_batches(prepared):
    """What reaches the loss: every class in about equal share (their class-aware sampler), where
    the training set holds 40 .. 4 images per class."""
    p, ds = prepared
    ctx = pretrained_context(p, ds)
    seen = []
    ctx.trainer.criterion.register_forward_hook(lambda m, args, out: seen.append(args[1].cpu()))
    dc.build_crt(epochs=3, batch_size=40, augment=False).run(ctx)
    y = torch.cat(seen)
    assert len(y) == 3 * (159 // 40) * 40
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 44  # 36 each on average; instance-balanced: 90 .. 9


def test_decoupling_strategies_need_the_whole_stage_one(prepared):
    p, ds = prepared
    ctx = pretrained_context(p, ds)
    ctx.until = ctx.trainer.epoch + 3  # finetune.start_epoch < train.epochs
    for build in (dc.build_crt, dc.build_tau_norm, dc.build_lws, dc.build_ncm):
        with pytest.raises(LongtailError, match="set finetune.start_epoch to train.epochs"):
            build().run(ctx)


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(LongtailError, match="finetunes.crt.epochs"):
        dc.build_crt(epochs=0)
    with pytest.raises(LongtailError, match="finetunes.tau_norm.tau"):
        dc.build_tau_norm(tau="big")
    with pytest.raises(LongtailError, match="finetunes.ncm.metric"):
        dc.build_ncm(metric="manhattan")
    with pytest.raises(LongtailError, match="finetunes.crt.epoch_size must be one of balanced, dataset"):
        dc.build_crt(epoch_size="n")
    with pytest.raises(LongtailError, match="finetunes.lws.bn must be one of train, eval"):
        dc.build_lws(bn="frozen")


# -- NCM ------------------------------------------------------------------------------------------

def test_ncm_head_is_nearest_class_mean_on_a_toy_example():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, generator=g) + 3 * torch.randn(4, 5, generator=g).repeat_interleave(15, 0)
    labels = torch.arange(4).repeat_interleave(15)
    means = dc.class_means(feats, labels, 4)
    fn = F.normalize(feats, dim=1)
    assert torch.allclose(means[2], fn[labels == 2].mean(0))
    queries = torch.randn(200, 5, generator=g) * 3
    q = F.normalize(queries, dim=1)
    nearest = torch.cdist(q, means).argmin(1)
    head = dc.ncm_head(means, "euclidean")
    assert torch.equal(head(queries).argmax(1), nearest)
    # the cosine variant is the largest cosine similarity to a mean
    cos = dc.ncm_head(means, "cosine")
    assert torch.equal(cos(queries).argmax(1), (q @ F.normalize(means, dim=1).t()).argmax(1))
    # a hand-made case: mean (1, 0) vs a short mean (0.1, 0): (0.6, 0.8) is nearer to (1, 0) ...
    head = dc.ncm_head(torch.tensor([[1.0, 0.0], [0.1, 0.0]]))
    assert head(torch.tensor([[0.6, 0.8]])).argmax(1).item() == 0
    # ... and (-1, 0) to the short one, though both have negative cosine to it
    assert head(torch.tensor([[-1.0, 0.0]])).argmax(1).item() == 1
    assert isinstance(make_head("ncm", 5, 4), type(head))


def test_ncm_strategy_sets_a_head_evaluate_can_rebuild(ctx):
    t = ctx.trainer
    before = backbone_state(t.model)
    dc.build_ncm().run(ctx)
    assert ctx.meta["head"] == "ncm"
    assert_same(before, backbone_state(t.model))
    m = rebuilt(ctx)
    feats = dc.extract_features(t)
    center = feats.mean(0)  # the default: centred, then L2-normalised features (the authors' cl2n)
    assert torch.allclose(m.classifier.center, center)
    means = dc.class_means(feats, t.data.y_train, 10, center)
    x = (t.data.x_train.float() / 255 - t.data.mean.view(-1, 1, 1)) / t.data.std.view(-1, 1, 1)
    with torch.no_grad():
        pred = m(x).argmax(1)
    # the predicted class is a nearest mean, up to float32 rounding of the head's logits. After two
    # epochs on 170 images the features are close together (distances ~1e-3), so the reference is
    # the exact squared distance in float64: cdist's matmul path loses ~1e-5 there.
    d2 = ((F.normalize((feats - center).double(), dim=1)[:, None, :] - means.double()[None]) ** 2).sum(-1)
    assert torch.allclose(d2.gather(1, pred[:, None]).squeeze(1), d2.min(1).values, rtol=0, atol=1e-6)
    assert (pred == d2.argmin(1)).float().mean() > 0.9


def test_ncm_cl2n_is_the_authors_rule_against_numpy():
    """The authors' default NCM (main.py --feat_type cl2n --dist_type l2): subtract the mean of all
    training features, L2-normalise, average per class (not normalised again); a test feature goes
    through the same centring and normalisation and takes the class of the nearest mean."""
    import numpy as np

    g = np.random.default_rng(0)
    train = np.abs(g.normal(size=(90, 6))) + 2.0 * np.repeat(np.abs(g.normal(size=(3, 6))), 30, 0)  # after ReLU: >= 0
    labels = np.repeat(np.arange(3), 30)
    test = np.abs(g.normal(size=(50, 6))) * 2.5
    mu = train.mean(0)
    cl2n = lambda f: (f - mu) / np.linalg.norm(f - mu, axis=1, keepdims=True)  # noqa: E731
    means = np.stack([cl2n(train)[labels == j].mean(0) for j in range(3)])
    expected = np.linalg.norm(cl2n(test)[:, None, :] - means[None], axis=2).argmin(1)

    tr = torch.tensor(train, dtype=torch.float32)
    center = tr.mean(0)
    head = dc.ncm_head(dc.class_means(tr, torch.tensor(labels), 3, center), "euclidean", center)
    assert torch.allclose(dc.class_means(tr, torch.tensor(labels), 3, center), torch.tensor(means, dtype=torch.float32),
                          atol=1e-6)
    assert head(torch.tensor(test, dtype=torch.float32)).argmax(1).tolist() == expected.tolist()
    # without the centring (l2n), features that are all >= 0 give another rule: at least one test
    # image changes class here
    plain = dc.ncm_head(dc.class_means(tr, torch.tensor(labels), 3), "euclidean")
    assert plain(torch.tensor(test, dtype=torch.float32)).argmax(1).tolist() != expected.tolist()
    with pytest.raises(LongtailError, match="finetunes.ncm.features must be one of cl2n, l2n"):
        dc.build_ncm(features="centred")


def test_an_ncm_checkpoint_from_before_the_centring_loads_as_plain_l2_normalisation():
    head = make_head("ncm", 3, 2)
    old = {"weight": torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), "bias": torch.tensor([-1.0, -1.0])}
    head.load_state_dict(old)  # no "center" key: the head of an older checkpoint
    assert torch.equal(head.center, torch.zeros(3))
    x = torch.tensor([[3.0, 1.0, 0.0]])
    assert torch.allclose(head(x), F.normalize(x, dim=1) @ old["weight"].t() + old["bias"])
