"""BBN's cumulative learning (Zhou et al., CVPR 2020; docs/methods.md §4) as the `bbn` fine-tune strategy.

It trains the whole schedule itself (finetune.start_epoch = 0, so the pretrain stage runs no
epoch) on a bilateral-branch model (model.arch = bbn_resnet32). Each step takes one batch from the
conventional sampler (uniform over instances) for the conventional branch and one from the
reversed sampler (p_j proportional to 1/n_j) for the re-balancing branch, and with
alpha = 1 - (T / T_max)^2 (T = 0-based epoch, T_max = train.epochs):

    z = W 2 [alpha f_c ; (1 - alpha) f_r],  loss = alpha L(z, y_c) + (1 - alpha) L(z, y_r)

L is the configured loss plugin (CE in the paper), with class weights only if this strategy's own
`reweighting` names a re-weighting plugin (default none, as in the paper); finetune.reweighting
and finetune.sampler are not used (the check refuses any but none / instance). The factor 2 is
the authors' combiner (`bbn_mix`); the model's plain forward mixes the branches with alpha = 0.5, i.e. W [f_c ; f_r], which is what evaluation
uses (the authors test on the concatenated features). The strategy hands the trainer its steps (`BBNSteps`), so the lr
schedule (train.lr, warm-up, train.milestones), evaluation, history, best-epoch tracking and the
resume checkpoints are the trainer's own. An epoch is floor(N / batch_size) steps: the authors' loader
drops the last partial batch. The CIFAR setting of the authors' code (Nesterov SGD, lr 0.1, warm-up 5,
lr x0.01 from 0-based epoch 120 and x0.0001 from 160: their scheduler runs under the PyTorch 1.0 they pin):

    model.arch=bbn_resnet32 finetune.strategy=bbn finetune.start_epoch=0 train.nesterov=true
    train.milestones=[120,160] train.milestone_factors=[0.01,0.0001] finetune.reweighting=none
"""

from __future__ import annotations

import torch

from .. import registry
from ..engine.contract import StepResult, sample_order
from ..engine.schedule import lr_at
from ..errors import LongtailError
from ..models.heads import classify


def bbn_alpha(epoch: int, epochs: int) -> float:
    """alpha = 1 - (T / T_max)^2: 1 at the first epoch, 0.75 half-way, towards 0 at the end."""
    return 1.0 - (epoch / epochs) ** 2


def _plugin_params(ctx, group_key: str, name: str) -> dict:
    return dict(((ctx.params.raw.get(group_key) or {}).get(name)) or {})


class BBN:
    uses_finetune_rebalancing = False  # its two branches' samplers and its own `reweighting`

    def __init__(self, conventional_sampler: str, rebalancing_sampler: str, reweighting: str):
        self.conventional_sampler, self.rebalancing_sampler = conventional_sampler, rebalancing_sampler
        self.reweighting = reweighting

    def samplers(self, ctx):
        counts = ctx.meta["class_counts"]
        return tuple(registry.build("samplers", name, counts, params=_plugin_params(ctx, "samplers", name),
                                    param_key=f"samplers.{name}")
                     for name in (self.conventional_sampler, self.rebalancing_sampler))

    def class_weight(self, ctx):
        counts = ctx.meta["class_counts"]
        w = registry.build("reweighting", self.reweighting, counts,
                           params=_plugin_params(ctx, "reweightings", self.reweighting),
                           param_key=f"reweightings.{self.reweighting}")
        w = torch.tensor(w, dtype=torch.float32)
        return None if torch.all(w == 1) else w.to(ctx.trainer.device)

    def run(self, ctx) -> None:
        t = ctx.trainer
        model = t.model
        if not hasattr(model, "branch_features"):
            raise LongtailError(f"finetune.strategy=bbn needs a bilateral-branch model (model.arch=bbn_resnet32), "
                                f"not model.arch={ctx.meta.get('arch')!r}")
        if ctx.params.finetune.start_epoch != 0:
            raise LongtailError("finetune.strategy=bbn trains the whole schedule itself: set finetune.start_epoch=0 "
                                f"(now {ctx.params.finetune.start_epoch})")
        ctx.fit(BBNSteps(t, *self.samplers(ctx), self.class_weight(ctx), ctx.log))


class BBNSteps:
    """engine.contract.Steps of cumulative learning: per step one batch of each sampler (the epoch is
    as long as the shorter order); train_acc = alpha acc(y_c) + (1 - alpha) acc(y_r); images_per_s
    counts both branches' images."""

    images_per_sample = 2

    def __init__(self, trainer, conventional, rebalancing, weight, log=None):
        self.t, self.conventional, self.rebalancing = trainer, conventional, rebalancing
        self.weight, self.log = weight, log
        self.reweighted = weight is not None

    def lr(self, epoch: int) -> float:
        c = self.t.cfg
        return lr_at(epoch, c.lr, c.warmup_epochs, c.milestones, c.milestone_factors)

    def batches(self, epoch: int):
        t, cfg = self.t, self.t.cfg
        self.alpha = bbn_alpha(epoch, cfg.epochs)
        if self.log is not None:
            self.log.log_metrics({"bbn_alpha": self.alpha}, step=epoch + 1)  # epoch numbers from 1
        order_c = sample_order(self.conventional, t.data.y_train_cpu, epoch, cfg.epochs, t.sample_gen).to(t.device)
        order_r = sample_order(self.rebalancing, t.data.y_train_cpu, epoch, cfg.epochs, t.sample_gen).to(t.device)
        n = min(len(order_c), len(order_r))
        n = n // cfg.batch_size * cfg.batch_size or n  # whole batches only (one partial one if N < batch)
        return [(order_c[i:i + cfg.batch_size], order_r[i:i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]

    def loss(self, batch) -> StepResult:
        t, alpha = self.t, self.alpha
        idx_c, idx_r = batch
        y_c, y_r = t.data.y_train[idx_c], t.data.y_train[idx_r]
        with t.autocast():
            f_c = t.model.branch_features(t.prepare(idx_c), "conventional")
            f_r = t.model.branch_features(t.prepare(idx_r), "rebalancing")
            feats = t.model.mix(f_c, f_r, alpha).float()
        logits = classify(t.model.classifier, feats)  # float32, as every other method's head
        loss = alpha * t.loss(logits, y_c, self.weight, feats) + (1 - alpha) * t.loss(logits, y_r, self.weight, feats)
        pred = logits.detach().argmax(1)
        correct = alpha * (pred == y_c).sum() + (1 - alpha) * (pred == y_r).sum()
        return StepResult(loss, logits, correct, len(idx_c))


def build_bbn(*, conventional_sampler: str = "instance", rebalancing_sampler: str = "reversed",
              reweighting: str = "none") -> BBN:
    """Samplers of the two branches (longtail.samplers plugins; the paper: uniform and reversed) and
    the re-weighting plugin for the loss (the paper: none)."""
    for key, name in (("conventional_sampler", conventional_sampler), ("rebalancing_sampler", rebalancing_sampler),
                      ("reweighting", reweighting)):
        if not isinstance(name, str):
            raise LongtailError(f"finetunes.bbn.{key} must be a plugin name, got {name!r}")
    return BBN(conventional_sampler, rebalancing_sampler, reweighting)
