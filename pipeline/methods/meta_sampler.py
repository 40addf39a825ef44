"""Balanced Meta-Softmax (Ren et al., NeurIPS 2020; docs/methods.md §4), stage 2: the `meta_sampler` fine-tune
strategy, as the authors' BalancedMetaSoftmax-Classification code runs it.

Stage 1 is a plain softmax (CE) model over the whole schedule (loss=ce,
finetune.start_epoch=train.epochs, finetune.reweighting=none); Balanced Softmax and the meta sampler act only in this
classifier stage. It re-trains a fresh classifier on the frozen backbone with Balanced Softmax,
CE(z + log n, y), for `iterations` steps (their 2,000) in epochs of floor(N / batch_size) steps.
Each step:

1. draw a batch from the learned sampler (`SampleRates`): every training image of class c has the
   unnormalised rate sigmoid(w_c); a straight-through Gumbel-softmax over all N images picks each
   of the batch's images (value 1, gradient to w through the soft sample);
2. one virtual step of the classifier on that batch, weighted by the straight-through values: the
   real optimizer's SGD update (its learning rate, momentum buffer and weight decay), kept
   differentiable;
3. meta loss = plain CE of the virtually-updated classifier on a class-balanced meta batch of
   training images (their class-aware sampler, one image per class visit); its gradient w.r.t. w
   updates w (Adam, meta_lr);
4. the real step: Balanced Softmax on the batch of step 1, unweighted (the trainer steps `opt`).

As in their classifier stage, the backbone's weights are frozen but it runs in train mode
(`bn: train`: BatchNorm uses batch statistics and its running statistics follow the sampled
data) on augmented images (`augment: true`), and the classifier is re-initialised (`reinit`).
Their real step runs the backbone again on the batch of step 1: in train mode that gives the
same features, so they are reused, and `BatchNormReplay` applies the running-statistics update the
second pass would have made. `augment: false` with `bn: eval` computes the features once.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checks import check_number, check_seed
from ..errors import LongtailError
from ..engine.contract import StepResult
from .classifier_stage import (BN_MODES, cosine_lr, epoch_logger, epoch_order, extract_features,
                               reinit_classifier, require_full_stage_one)
from .samplers import ClassAwareSampler


class SampleRates:
    """The learned sampler (their `SampleLearner`): one logit w_c per class, and every training image
    of class c drawn with the unnormalised rate sigmoid(w_c), so class c gets n_c sigmoid(w_c) / sum.
    Start: rate_c = p_c^-init_pow / (min + max) with p_c = n_c / N, i.e. rate 1/2 for every image
    (instance-balanced) at init_pow 0, class-balanced at init_pow 1."""

    def __init__(self, class_counts, labels: torch.Tensor, init_pow: float = 0.0):
        counts = torch.tensor(class_counts, dtype=torch.float64)
        rate = (counts / counts.sum()).pow(-init_pow)
        rate = rate / (rate.min() + rate.max())
        self.counts = counts.float().to(labels.device)
        self.labels = labels
        self.w = nn.Parameter((rate.log() - (1 - rate).log()).float().to(labels.device))

    def rates(self) -> torch.Tensor:
        """sigmoid(w_c): the unnormalised per-image rate of each class (what their log prints)."""
        return torch.sigmoid(self.w.detach())

    def class_probabilities(self) -> torch.Tensor:
        """The class distribution of a drawn batch: n_c sigmoid(w_c), normalised."""
        q = self.counts * self.rates()
        return q / q.sum()

    def sample(self, batch: int, generator: torch.Generator, temperature: float = 1.0):
        """Positions [B] of `batch` training images, each drawn with probability proportional to its
        rate (Gumbel-max over all N images), and their straight-through weights [B]: value 1, gradient
        to w through the soft sample softmax((log rate + g) / temperature) at the drawn image. The
        B x N noise is drawn on the generator's device."""
        log_rate = F.logsigmoid(self.w)[self.labels]  # [N]
        u = torch.rand(batch, len(self.labels), generator=generator, device=generator.device).clamp_(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u)).to(log_rate.device)
        soft = torch.softmax((log_rate + gumbel) / temperature, dim=1)
        idx = soft.detach().argmax(1)
        picked = soft.gather(1, idx[:, None]).squeeze(1)
        return idx, 1 - picked.detach() + picked


class BatchNormReplay:
    """Replays the running-statistics update of train-mode BatchNorm for a batch the backbone has
    already seen: `recording()` around a forward pass notes each layer's batch statistics (from its
    running statistics before and after), `apply()` updates the running statistics with them again,
    as a second forward pass of the same batch would (exactly, up to float rounding)."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.stats: list | None = None

    @staticmethod
    def _factor(m, count) -> float:
        return 1.0 / float(count) if m.momentum is None else m.momentum  # None: a cumulative average

    @contextmanager
    def recording(self):
        before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in self.layers]
        yield
        self.stats = []
        for m, (mean0, var0, count0) in zip(self.layers, before):
            if torch.equal(m.num_batches_tracked, count0):  # a layer this forward pass did not run
                self.stats.append(None)
                continue
            f = self._factor(m, m.num_batches_tracked)
            # after = (1 - f) before + f batch, solved for batch
            self.stats.append(((m.running_mean - (1 - f) * mean0) / f, (m.running_var - (1 - f) * var0) / f))

    @torch.no_grad()
    def apply(self) -> None:
        if self.stats is None:
            raise RuntimeError("BatchNormReplay.apply() without a recorded forward pass")
        for m, stats in zip(self.layers, self.stats):
            if stats is None:
                continue
            mean, var = stats
            m.num_batches_tracked += 1
            f = self._factor(m, m.num_batches_tracked)
            m.running_mean.mul_(1 - f).add_(f * mean)
            m.running_var.mul_(1 - f).add_(f * var)
        self.stats = None


def stage_two_epochs(iterations: int, n: int, batch_size: int) -> tuple[int, int]:
    """(epochs, steps per epoch) of their schedule: an epoch is floor(N / batch_size) steps (at least
    1), and the stage runs whole epochs until `iterations` steps are reached."""
    steps = max(n // batch_size, 1)
    return math.ceil(iterations / steps), steps


class MetaSamplerTraining:
    """Stage-2 training of the classifier on backbone features, as engine.contract.Steps. Each step
    draws a batch from the learned rates, makes the meta step, then returns the real step's
    Balanced Softmax loss on that batch (the trainer steps `opt`, which it holds as its optimizer).
    `features(idx)` gives the features of training samples idx (fresh per batch, or rows of a
    precomputed bank); `bn_replay` (or None) repeats the BatchNorm update of the batch's forward pass.
    Meta batches come from `meta_sampler` (their class-aware sampler, one image per class visit),
    whose cycles restart each epoch, drawn from `generator` (CPU); the sampler's Gumbel noise from
    `noise_generator` (default `generator`; the trainer's device generator in the pipeline). Stage-2 epoch e has cosine lr at e - first. w and its Adam
    state go in the checkpoint."""

    def __init__(self, classifier: nn.Module, features: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                 class_counts, generator: torch.Generator, *, epochs: int, steps_per_epoch: int, lr: float,
                 batch_size: int, meta_batch_size: int, momentum: float, weight_decay: float, meta_lr: float,
                 temperature: float, init_pow: float, first: int = 0, bn_replay: BatchNormReplay | None = None,
                 meta_sampler=None, noise_generator: torch.Generator | None = None):
        self.classifier, self.features, self.labels = classifier, features, labels
        self.generator, self.epochs, self.steps_per_epoch = generator, epochs, steps_per_epoch
        self.noise_generator = noise_generator or generator
        self.lr_base, self.batch_size, self.meta_batch_size = lr, batch_size, meta_batch_size
        self.first, self.temperature, self.bn_replay = first, temperature, bn_replay
        self.meta_losses: list[float] = []
        self.meta_order = torch.zeros(0, dtype=torch.long)
        self.log_prior = torch.tensor(class_counts, dtype=torch.float32).log().to(labels.device)
        self.meta_sampler = meta_sampler or ClassAwareSampler(class_counts, per_visit=1)
        self.sampler = SampleRates(class_counts, labels, init_pow)
        self.meta_opt = torch.optim.Adam([self.sampler.w], lr=meta_lr)
        self.opt = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=lr,
                                   momentum=momentum, weight_decay=weight_decay)

    def _bs(self, logits, y, reduction="mean"):
        return F.cross_entropy(logits + self.log_prior, y, reduction=reduction)

    def _trainable(self) -> dict:
        return {k: v for k, v in self.classifier.named_parameters() if v.requires_grad}

    def _virtual_step(self, loss: torch.Tensor) -> dict:
        """The classifier's parameters after one step of `opt` on `loss` (SGD: weight decay, then the
        momentum buffer; PyTorch's update), differentiable w.r.t. whatever `loss` depends on."""
        params = self._trainable()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        group = self.opt.param_groups[0]
        updated = {}
        for (k, p), g in zip(params.items(), grads):
            d = g + group["weight_decay"] * p.detach()
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if group["momentum"] and buf is not None:
                d = group["momentum"] * buf + d
            updated[k] = p.detach() - group["lr"] * d
        return updated

    def meta_step(self, feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, meta_idx: torch.Tensor) -> float:
        logits = functional_call(self.classifier, self._trainable(), (feats,))
        updated = self._virtual_step((weight * self._bs(logits, y, "none")).mean())
        meta_logits = functional_call(self.classifier, updated, (self.features(meta_idx),))
        meta_loss = F.cross_entropy(meta_logits, self.labels[meta_idx])
        (grad_w,) = torch.autograd.grad(meta_loss, [self.sampler.w])
        self.meta_opt.zero_grad(set_to_none=True)
        self.sampler.w.grad = grad_w
        self.meta_opt.step()
        return meta_loss.item()

    # -- engine.contract.Steps: the meta step, then the real step's loss, per batch -------------------
    def lr(self, epoch: int) -> float:
        return cosine_lr(self.lr_base, epoch - self.first, self.epochs)

    def batches(self, epoch: int):
        self.meta_losses = []
        self.meta_order = epoch_order(self.meta_sampler, self.labels.cpu(), epoch - self.first, self.epochs,
                                      self.generator, self.steps_per_epoch * self.meta_batch_size).to(self.labels.device)
        return range(self.steps_per_epoch)

    def loss(self, step: int) -> StepResult:
        idx, weight = self.sampler.sample(self.batch_size, self.noise_generator, self.temperature)
        with self.bn_replay.recording() if self.bn_replay is not None else nullcontext():
            feats = self.features(idx)
        y = self.labels[idx]
        meta_idx = self.meta_order[step * self.meta_batch_size:(step + 1) * self.meta_batch_size]
        self.meta_losses.append(self.meta_step(feats, y, weight, meta_idx))
        if self.bn_replay is not None:  # their real step's second forward pass of this batch
            self.bn_replay.apply()
        logits = self.classifier(feats)
        return StepResult(self._bs(logits, y), logits, (logits.detach().argmax(1) == y).sum(), len(y))

    def state_dict(self) -> dict:
        return {"w": self.sampler.w.detach().clone(), "meta_opt": self.meta_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.sampler.w.copy_(state["w"])
        self.meta_opt.load_state_dict(state["meta_opt"])


class MetaSampler:
    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)
    uses_finetune_rebalancing = False  # its learned sampler and Balanced Softmax re-balance

    def __init__(self, **kw):
        self.kw = kw
        self.rates: list[float] | None = None

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "meta_sampler")
        t, kw = ctx.trainer, dict(self.kw)
        model, counts = t.model, ctx.meta["class_counts"]
        clf = model.classifier
        init_seed = kw.pop("init_seed")
        if kw.pop("reinit"):
            reinit_classifier(clf, init_seed)
        augment, train_bn = kw.pop("augment"), kw.pop("bn") == "train"
        if augment or train_bn:  # the authors' way: frozen weights, fresh features for every batch
            def features(idx):
                return extract_features(t, idx, augment, train_bn, whole_batch=True)
        else:  # eval-mode BatchNorm, no augmentation: the features never change, compute them once
            bank = extract_features(t)

            def features(idx):
                return bank[idx.to(bank.device)]
        epochs, steps = stage_two_epochs(kw.pop("iterations"), len(t.data.y_train), kw["batch_size"])
        first = t.epoch
        training = MetaSamplerTraining(clf, features, t.data.y_train, counts, t.sample_gen, epochs=epochs,
                                       steps_per_epoch=steps, first=first,
                                       bn_replay=BatchNormReplay(model) if train_bn else None,
                                       noise_generator=t.aug_gen, **kw)
        t.optimizer = training.opt
        t.reset_best()  # the stage-1 snapshot holds another classifier
        on_epoch, on_batch = epoch_logger(ctx, "meta_sampler", first, first + epochs)

        def log_epoch(row):
            on_epoch(row)
            if ctx.log is not None:
                probs = training.sampler.class_probabilities().tolist()
                meta = sum(training.meta_losses) / max(len(training.meta_losses), 1)
                ctx.log.log_metrics({"meta_loss": meta, **{f"sampler_rate/{j:03d}": r for j, r in enumerate(probs)}},
                                    step=row["epoch"] + 1)  # epoch numbers from 1

        ctx.fit(training, first + epochs, on_epoch=log_epoch, on_batch=on_batch)
        self.rates = training.sampler.class_probabilities().tolist()
        ctx.meta["meta_sampler_rates"] = self.rates
        print("finetune[meta_sampler]: learned class sampling rates "
              + " ".join(f"{r:.3f}" for r in self.rates) + f" (class counts {counts})")


def build_meta_sampler(*, iterations: int = 2000, lr: float = 0.1, batch_size: int = 512, meta_batch_size: int = 512,
                       momentum: float = 0.9, weight_decay: float = 5e-4, meta_lr: float = 0.01,
                       temperature: float = 1.0, init_pow: float = 0.0, reinit: bool = True, init_seed: int = 0,
                       augment: bool = True, bn: str = "train") -> MetaSampler:
    """The authors' CIFAR-LT BALMS config: 2,000 steps of batch 512, SGD lr 0.1 (cosine to 0), momentum
    0.9, wd 5e-4 for a fresh classifier on augmented batches through the frozen backbone in train
    mode; Adam (lr 0.01) on the sampler's logits from instance-balanced rates; meta batches of 512."""
    for key, v in (("iterations", iterations), ("batch_size", batch_size), ("meta_batch_size", meta_batch_size)):
        check_number(f"finetunes.meta_sampler.{key}", v, min=1, integer=True)
    for key, v in (("lr", lr), ("meta_lr", meta_lr), ("temperature", temperature)):
        check_number(f"finetunes.meta_sampler.{key}", v, above=0)
    for key, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        check_number(f"finetunes.meta_sampler.{key}", v, min=0)
    check_number("finetunes.meta_sampler.init_pow", init_pow)
    for key, v in (("reinit", reinit), ("augment", augment)):
        if not isinstance(v, bool):
            raise LongtailError(f"finetunes.meta_sampler.{key} must be true or false, got {v!r}")
    if bn not in BN_MODES:
        raise LongtailError(f"finetunes.meta_sampler.bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    return MetaSampler(iterations=iterations, lr=float(lr), batch_size=batch_size, meta_batch_size=meta_batch_size,
                       momentum=float(momentum), weight_decay=float(weight_decay), meta_lr=float(meta_lr),
                       temperature=float(temperature), init_pow=float(init_pow), reinit=reinit,
                       init_seed=check_seed("finetunes.meta_sampler.init_seed", init_seed), augment=augment, bn=bn)
