"""BBN's cumulative learning (Zhou et al., CVPR 2020) as the `bbn` fine-tune strategy.

It trains the whole schedule itself (finetune.start_epoch = 0, so the pretrain stage runs no
epoch) on a bilateral-branch model (model.arch = bbn_resnet32). Each step takes one batch from the
conventional sampler (uniform over instances) for the conventional branch and one from the
reversed sampler (p_j proportional to 1/n_j) for the re-balancing branch, and with
alpha = 1 - (T / T_max)^2 (T = 0-based epoch, T_max = train.epochs):

    z = W 2 [alpha f_c ; (1 - alpha) f_r],  loss = alpha L(z, y_c) + (1 - alpha) L(z, y_r)

L is the configured loss plugin (CE in the paper), with class weights only if this strategy's own
`reweighting` names a re-weighting plugin (default none, as in the paper); finetune.reweighting
and finetune.sampler are not used. The factor 2 is the authors' combiner (`bbn_mix`); the model's
plain forward mixes the branches with alpha = 0.5, i.e. W [f_c ; f_r], which is what evaluation
uses (the authors test on the concatenated features). The epoch runs through Trainer.fit's `train_epoch` hook, so the lr
schedule (train.lr, warm-up, train.milestones), evaluation, history, best-epoch tracking and the
resume checkpoints are the trainer's own. The CIFAR setting of the authors' code (lr 0.1, warm-up 5,
lr x0.01 from epoch 120 and x0.0001 from epoch 160):

    model.arch=bbn_resnet32 finetune.strategy=bbn finetune.start_epoch=0
    train.milestones=[120,160] train.milestone_factors=[0.01,0.0001]
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .. import registry
from ..data.augment import augment, normalize
from ..engine.schedule import lr_at
from ..errors import LongtailError


def bbn_alpha(epoch: int, epochs: int) -> float:
    """alpha = 1 - (T / T_max)^2: 1 at the first epoch, 0.75 half-way, towards 0 at the end."""
    return 1.0 - (epoch / epochs) ** 2


def _plugin_params(ctx, group_key: str, name: str) -> dict:
    return dict(((ctx.params.raw.get(group_key) or {}).get(name)) or {})


class BBN:
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
        conventional, rebalancing = self.samplers(ctx)
        weight = self.class_weight(ctx)
        cfg, d = t.cfg, t.data
        autocast = t.autocast if hasattr(t, "autocast") else nullcontext

        def prepare(idx):
            x = normalize(augment(d.x_train[idx], t.pad, t.flip, t.aug_gen), d.mean, d.std)
            return x.contiguous(memory_format=torch.channels_last) if getattr(t, "channels_last", False) else x

        def train_epoch(e: int, on_batch=None) -> dict:
            lr = lr_at(e, cfg.lr, cfg.warmup_epochs, cfg.milestones, cfg.milestone_factors)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            if hasattr(t.criterion, "set_epoch"):
                t.criterion.set_epoch(e, cfg.epochs)
            alpha = bbn_alpha(e, cfg.epochs)
            order_c = conventional.indices(d.y_train_cpu, e, cfg.epochs, t.sample_gen).to(t.device)
            order_r = rebalancing.indices(d.y_train_cpu, e, cfg.epochs, t.sample_gen).to(t.device)
            n = min(len(order_c), len(order_r))
            model.train()
            loss_sum = torch.zeros((), device=t.device)
            correct = torch.zeros((), device=t.device)
            start = time.perf_counter()
            steps = (n + cfg.batch_size - 1) // cfg.batch_size
            for step in range(steps):
                sl = slice(step * cfg.batch_size, min((step + 1) * cfg.batch_size, n))
                idx_c, idx_r = order_c[sl], order_r[sl]
                y_c, y_r = d.y_train[idx_c], d.y_train[idx_r]
                with autocast():
                    f_c = model.branch_features(prepare(idx_c), "conventional")
                    f_r = model.branch_features(prepare(idx_r), "rebalancing")
                    feats = model.mix(f_c, f_r, alpha)
                    logits = model.classifier(feats).float()
                    loss = (alpha * t._loss(logits, feats, y_c, weight)
                            + (1 - alpha) * t._loss(logits, feats, y_r, weight))
                t.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                t.optimizer.step()
                pred = logits.detach().argmax(1)
                loss_sum += loss.detach() * len(idx_c)
                correct += alpha * (pred == y_c).sum() + (1 - alpha) * (pred == y_r).sum()
                if on_batch is not None:
                    on_batch(step + 1, steps)
            seconds = time.perf_counter() - start
            if ctx.log is not None:
                ctx.log.log_metrics({"bbn_alpha": alpha}, step=e)
            # train_acc = alpha acc(y_c) + (1 - alpha) acc(y_r); images_per_s counts both branches' images
            return {"epoch": e, "lr": lr, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n,
                    "images_per_s": 2 * n / max(seconds, 1e-9), "epoch_seconds": seconds,
                    "reweighted": weight is not None}

        t.fit(ctx.until, train_epoch=train_epoch, **ctx.fit_kwargs)


def build_bbn(*, conventional_sampler: str = "instance", rebalancing_sampler: str = "reversed",
              reweighting: str = "none") -> BBN:
    """Samplers of the two branches (longtail.samplers plugins; the paper: uniform and reversed) and
    the re-weighting plugin for the loss (the paper: none)."""
    for key, name in (("conventional_sampler", conventional_sampler), ("rebalancing_sampler", rebalancing_sampler),
                      ("reweighting", reweighting)):
        if not isinstance(name, str):
            raise LongtailError(f"finetunes.bbn.{key} must be a plugin name, got {name!r}")
    return BBN(conventional_sampler, rebalancing_sampler, reweighting)
