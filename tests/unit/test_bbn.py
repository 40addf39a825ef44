"""BBN (Zhou et al., CVPR 2020): alpha schedule, test-time mix, the two samplers, branch structure,
and one short run through the pretrain / finetune / evaluate stages."""

from types import SimpleNamespace

import pytest
import torch

from testkit import named_method_params, project_params, tiny_two_stage
from testkit.twostage import assert_same, prepare

from pipeline import io
from pipeline.errors import LongtailError
from pipeline.methods.bbn import bbn_alpha, build_bbn
from pipeline.models.bbn import BBNResNet, build_bbn_resnet32
from pipeline.models.resnet import build_resnet32
from pipeline.params import parse


def test_alpha_schedule():
    assert bbn_alpha(0, 200) == 1.0
    assert bbn_alpha(100, 200) == 0.75
    assert bbn_alpha(50, 200) == pytest.approx(1 - 1 / 16)
    assert bbn_alpha(150, 200) == pytest.approx(1 - 9 / 16)
    assert bbn_alpha(200, 200) == 0.0
    values = [bbn_alpha(e, 200) for e in range(200)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_the_plain_forward_is_the_concatenation_of_both_branches():
    """The authors' combiner scales the mix by 2: at test (alpha = 0.5) the classifier sees [f_c ; f_r]."""
    torch.manual_seed(0)
    m = build_bbn_resnet32(4, 3, "linear").eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        f_c, f_r = m.branch_features(x, "conventional"), m.branch_features(x, "rebalancing")
        z = m(x)
        w_c, w_r = m.classifier.weight[:, :64], m.classifier.weight[:, 64:]
        assert torch.allclose(z, f_c @ w_c.t() + f_r @ w_r.t() + m.classifier.bias, atol=1e-5)
        assert torch.allclose(m.features(x), torch.cat([f_c, f_r], 1), atol=1e-6)
        # and it is not some other mix
        assert not torch.allclose(z, m.classifier(torch.cat([0.5 * f_c, 0.5 * f_r], 1)), atol=1e-3)


def test_the_training_mix_is_twice_the_weighted_concatenation():
    f_c, f_r = torch.randn(3, 64), torch.randn(3, 64)
    assert torch.allclose(BBNResNet.mix(f_c, f_r, 0.8), torch.cat([1.6 * f_c, 0.4 * f_r], 1))
    assert torch.allclose(BBNResNet.mix(f_c, f_r, 1.0), torch.cat([2 * f_c, 0 * f_r], 1))


def _authors_lr(epoch: int, base: float = 0.1) -> float:
    """Their WarmupMultiStepLR (lib/utils/lr_scheduler.py, configs/cifar10.yaml: LR_STEP [120, 160],
    LR_FACTOR 0.01, WARM_EPOCH 5, warm-up factor 1/3) during 0-based epoch e, written out by hand.
    main/train.py steps it at the start of every 1-based epoch; under the PyTorch they pin (1.0.1) a
    new scheduler leaves last_epoch at -1, so the first step makes it 0: last_epoch = e."""
    last_epoch = epoch
    warm = 1.0
    if last_epoch < 5:
        a = last_epoch / 5
        warm = (1 / 3) * (1 - a) + a
    drops = sum(1 for m in (120, 160) if m <= last_epoch)  # bisect_right
    return base * warm * 0.01 ** drops


def test_the_named_method_uses_the_authors_lr_schedule(default_params):
    """The authors' CIFAR config: Nesterov SGD and their lr at every epoch after the warm-up (ours is
    the protocol's, a documented difference): x0.01 from 0-based epoch 120, x0.0001 from 160."""
    from pipeline.engine.schedule import lr_at
    from pipeline.params import override

    bbn = named_method_params("BBN")
    assert bbn["train.nesterov"] is True
    t = parse(override(default_params, bbn)).train
    assert (t.epochs, t.lr, t.warmup_epochs) == (200, 0.1, 5)
    ours = [lr_at(e, t.lr, t.warmup_epochs, t.milestones, t.milestone_factors) for e in range(t.epochs)]
    theirs = [_authors_lr(e) for e in range(200)]
    assert ours[5:] == pytest.approx(theirs[5:], rel=1e-12)
    assert (ours[119], ours[120], ours[159], ours[160]) == pytest.approx((0.1, 1e-3, 1e-3, 1e-5))
    # the documented warm-up difference, as docs/methods.md states it
    assert theirs[:5] == pytest.approx([0.1 / 3, 0.1 * 7 / 15, 0.06, 0.1 * 11 / 15, 0.1 * 13 / 15])
    assert ours[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])


def test_branch_structure():
    m = build_bbn_resnet32(10, 3, "linear")
    assert len(m.trunk) == 14 and len(m.conventional) == 1 and len(m.rebalancing) == 1
    assert m.feature_dim == 128 and m.classifier.weight.shape == (10, 128)
    # the last blocks are distinct modules with distinct parameters, initialised independently
    pc, pr = list(m.conventional.parameters()), list(m.rebalancing.parameters())
    assert len(pc) == len(pr) and not {id(p) for p in pc} & {id(p) for p in pr}
    assert not torch.equal(m.conventional[0].conv1.weight, m.rebalancing[0].conv1.weight)
    # the shared trunk: one set of parameter objects, used by both branches
    x = torch.randn(2, 3, 8, 8)
    for branch, other in (("conventional", "rebalancing"), ("rebalancing", "conventional")):
        m.zero_grad(set_to_none=True)
        m.branch_features(x, branch).sum().backward()
        assert all(p.grad is not None for p in m.trunk.parameters())
        assert m.conv1.weight.grad is not None
        assert all(p.grad is not None for p in getattr(m, branch).parameters())
        assert all(p.grad is None for p in getattr(m, other).parameters())
    # one extra basic block (and a wider classifier) over ResNet-32
    plain = sum(p.numel() for p in build_resnet32(10, 3, "linear").parameters())
    block = sum(p.numel() for p in m.rebalancing.parameters())
    assert sum(p.numel() for p in m.parameters()) == plain + block + 64 * 10
    # branch_blocks = 5: each branch owns the whole last stage
    m5 = BBNResNet(10, 3, "linear", branch_blocks=5)
    assert len(m5.trunk) == 10 and len(m5.conventional) == 5
    with pytest.raises(LongtailError, match="model.branch_blocks"):
        build_bbn_resnet32(10, 3, "linear", branch_blocks=0)


def test_the_two_samplers_class_frequencies():
    counts = [100, 30, 10, 3]
    ctx = SimpleNamespace(meta={"class_counts": counts}, params=SimpleNamespace(raw={}))
    conventional, rebalancing = build_bbn().samplers(ctx)
    labels = torch.arange(4).repeat_interleave(torch.tensor(counts))
    g = torch.Generator().manual_seed(0)
    epochs = 300
    draws_c = torch.cat([conventional.indices(labels, e, epochs, g) for e in range(epochs)])
    draws_r = torch.cat([rebalancing.indices(labels, e, epochs, g) for e in range(epochs)])
    freq_c = torch.bincount(labels[draws_c], minlength=4).double() / len(draws_c)
    freq_r = torch.bincount(labels[draws_r], minlength=4).double() / len(draws_r)
    n = torch.tensor(counts, dtype=torch.float64)
    # conventional: uniform over instances, every image once an epoch -> exactly n_j / N
    assert torch.allclose(freq_c, n / n.sum())
    first = conventional.indices(labels, 0, epochs, g)
    assert sorted(first.tolist()) == list(range(len(labels)))
    # re-balancing (reversed): p_j proportional to 1 / n_j
    inv = (1 / n) / (1 / n).sum()
    assert torch.allclose(freq_r, inv, atol=0.01), (freq_r, inv)
    assert freq_r[3] > 0.6 and freq_r[0] < 0.03


def test_bbn_runs_through_the_stages_and_evaluates(tmp_path):
    from pipeline.stages import evaluate, training

    raw = tiny_two_stage(project_params(), epochs=3)
    raw["model"] = {"arch": "bbn_resnet32"}
    raw["finetune"].update(strategy="bbn", start_epoch=0)
    p, ds = prepare(tmp_path, raw)
    files = dict(dataset=ds, pretrain=tmp_path / "pre.pt", final=tmp_path / "final.pt", resume_dir=tmp_path / "r")
    assert training.run("pretrain", p, **files)["epochs_run"] == 0
    summary = training.run("finetune", p, **files)
    assert summary["epochs_run"] == 3
    state = io.load_checkpoint(tmp_path / "final.pt")
    keys = {"epoch", "lr", "train_loss", "train_acc", "images_per_s", "epoch_seconds", "reweighted", "test_acc"}
    assert [set(r) for r in state["history"]] == [keys] * 3
    assert [r["epoch"] for r in state["history"]] == [0, 1, 2] and state["best"]["epoch"] in (0, 1, 2)
    result = evaluate.run(p, dataset=ds, final=tmp_path / "final.pt", metrics=tmp_path / "eval.json",
                          plots=tmp_path / "plots")
    assert result["final"]["epoch"] == 3 and 0 <= result["final"]["top1"] <= 1
    # killed after epoch 0 and resumed: the same model as the uninterrupted run (the strategy keeps
    # to the trainer's RNGs, optimizer and checkpoints)
    (tmp_path / "final.pt").unlink()
    trainer, meta = training.setup(p, ds)
    trainer.load_state_dict(io.load_checkpoint(tmp_path / "pre.pt"))
    build_bbn().run(training.FinetuneContext(p, trainer, meta, 1, {}, None))
    assert trainer.epoch == 1
    io.save_torch(tmp_path / "r" / "finetune.pt", {**trainer.state_dict(), "meta": meta,
                                                   "fingerprint": training._fingerprint("finetune", p, ds)})
    training.run("finetune", p, **files)
    resumed = io.load_checkpoint(tmp_path / "final.pt")
    assert_same(state["model"], resumed["model"])


def test_bbn_refuses_a_plain_model_or_a_pretrain_phase(tmp_path):
    from pipeline.stages import training

    raw = tiny_two_stage(project_params(), epochs=2)
    raw["finetune"].update(strategy="bbn", start_epoch=0)
    p, ds = prepare(tmp_path, raw)
    trainer, meta = training.setup(p, ds)
    with pytest.raises(LongtailError, match="model.arch=bbn_resnet32"):
        build_bbn().run(training.FinetuneContext(p, trainer, meta, 2, {}, None))
    raw["model"] = {"arch": "bbn_resnet32"}
    raw["finetune"]["start_epoch"] = 1
    p = parse(raw)
    trainer, meta = training.setup(p, ds)
    with pytest.raises(LongtailError, match="set finetune.start_epoch=0"):
        build_bbn().run(training.FinetuneContext(p, trainer, meta, 2, {}, None))


def test_the_classifier_keeps_pytorchs_default_init():
    """The authors' `_weights_init` (kaiming normal) covers the backbone's convolutions only; their
    classifier is a plain nn.Linear, uniform in +-1/sqrt(fan_in). Kaiming normal on the 128-d head
    (std 0.125) would put many weights beyond that bound."""
    torch.manual_seed(0)
    m = build_bbn_resnet32(10, 3, "linear")
    bound = 1 / m.feature_dim ** 0.5
    assert m.classifier.weight.abs().max() <= bound and m.classifier.bias.abs().max() <= bound
    assert m.conv1.weight.std() > 0.15  # kaiming normal, std sqrt(2 / 27) = 0.27


def _bbn_trainer(tmp_path, **train):
    from pipeline.stages import training

    raw = tiny_two_stage(project_params(), epochs=2)
    raw["model"] = {"arch": "bbn_resnet32"}
    raw["finetune"].update(strategy="bbn", start_epoch=0)
    raw["train"].update(train)
    p, ds = prepare(tmp_path, raw)
    trainer, meta = training.setup(p, ds)
    return p, trainer, meta


def test_nesterov_momentum_is_a_train_param(tmp_path):
    _, plain, _ = _bbn_trainer(tmp_path / "a")
    _, nesterov, _ = _bbn_trainer(tmp_path / "b", nesterov=True)
    assert plain.optimizer.param_groups[0]["nesterov"] is False
    assert nesterov.optimizer.param_groups[0]["nesterov"] is True


def test_an_epoch_is_whole_batches_and_the_head_runs_in_float32(tmp_path):
    """As the authors' loader (drop_last) an epoch has floor(N / batch) full batches; and under bf16
    the classifier computes its logits outside autocast, as every other method's head."""
    from pipeline.methods.bbn import BBNSteps

    p, t, meta = _bbn_trainer(tmp_path, precision="bf16")
    steps = BBNSteps(t, *build_bbn().samplers(SimpleNamespace(meta=meta, params=p)), None)
    batches = steps.batches(0)
    n, bs = len(t.data.y_train), p.train.batch_size
    assert n % bs, "the test needs a partial last batch to drop"
    assert len(batches) == n // bs and all(len(c) == len(r) == bs for c, r in batches)

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            seen.append((torch.is_autocast_enabled(x.device.type), x.dtype))
            return self.head(x)

    t.model.classifier = Recording(t.model.classifier)
    result = steps.loss(batches[0])
    assert seen == [(False, torch.float32)] and result.logits.dtype == torch.float32


def test_fewer_images_than_a_batch_still_make_one_step(tmp_path):
    """Whole batches only, but a training set smaller than one batch gives one partial batch rather
    than an epoch of no steps (which would leave the model untrained without a word)."""
    from pipeline.methods.bbn import BBNSteps

    p, t, meta = _bbn_trainer(tmp_path, batch_size=100000)
    steps = BBNSteps(t, *build_bbn().samplers(SimpleNamespace(meta=meta, params=p)), None)
    batches = steps.batches(0)
    assert len(batches) == 1 and len(batches[0][0]) == len(t.data.y_train)
