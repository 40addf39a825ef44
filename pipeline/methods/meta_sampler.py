"""Balanced Meta-Softmax (Ren et al., NeurIPS 2020; docs/methods.md §4), stage 2: the `meta_sampler` fine-tune
strategy.

Stage 1 is a plain softmax (CE) model over the whole schedule (loss=ce,
finetune.start_epoch=train.epochs), as in the authors' released recipe: Balanced Softmax and the
meta sampler act only in this classifier stage.
Stage 2 re-trains the classifier on the frozen backbone with Balanced Softmax,
CE(z + log n, y), on batches drawn from a learnable class distribution pi = softmax(phi). Each step:

1. draw a batch with straight-through Gumbel-softmax over phi: class c_b = argmax(phi + g_b)
   (a sample of pi), weight s_b = [hard one-hot - soft.detach() + soft]_{c_b} (value 1, gradient to
   phi through soft = softmax((phi + g_b) / temperature)), then a uniform image of class c_b;
2. one virtual SGD step of the classifier: theta' = theta - lr * grad_theta mean_b s_b BS(x_b, c_b);
3. meta loss = plain CE of the classifier theta' on a small class-balanced meta set taken from the
   training set; its gradient w.r.t. phi (through theta') updates phi (Adam, meta_lr);
4. a real SGD step of the classifier with Balanced Softmax on a batch drawn from the updated pi.

As in the authors' classifier stage, the backbone's weights are frozen but it runs in train mode
(`bn: train`: BatchNorm uses batch statistics and its running statistics follow the re-sampled
data) on augmented images (`augment: true`), so every batch's features are computed afresh (no
gradient reaches the backbone), and the classifier is re-initialised (`reinit: true`; the authors do
not load the stage-1 classifier). `augment: false` with `bn: eval` computes the features once and
reuses them (faster, and a different recipe).
Simplifications: the meta set is part of the training set (its tail classes have too few images
to hold any out) and its features are computed like the training batch's at each meta step; phi
starts at the instance-balanced rates log(n_j / N) (`init: class_balanced` starts uniform); one
virtual step per real step, with the real step's learning rate. Stage 2 always uses Balanced
Softmax (the paper's loss), whatever `loss` trained stage 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checks import check_number
from ..errors import LongtailError
from ..engine.contract import StepResult
from .classifier_stage import (BN_MODES, balanced_subset, cosine_lr, epoch_logger, extract_features,
                               reinit_classifier, require_full_stage_one)


class ClassSampler:
    """A learnable class distribution pi = softmax(phi)."""

    def __init__(self, class_counts, init: str = "instance", device="cpu"):
        counts = torch.tensor(class_counts, dtype=torch.float32)
        start = counts.log() - counts.sum().log() if init == "instance" else torch.zeros(len(counts))
        self.phi = nn.Parameter(start.to(device))

    def rates(self) -> torch.Tensor:
        return torch.softmax(self.phi.detach(), 0)

    def gumbel(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch, len(self.phi), generator=generator).clamp_(1e-10, 1 - 1e-7)
        return (-torch.log(-torch.log(u))).to(self.phi.device)

    def sample_straight_through(self, batch: int, generator, temperature: float):
        """Classes [B] (samples of pi) and their straight-through weights [B] (value 1, grad to phi)."""
        soft = torch.softmax((self.phi + self.gumbel(batch, generator)) / temperature, dim=1)
        cls = soft.detach().argmax(1)
        hard = F.one_hot(cls, len(self.phi)).to(soft)
        weight = (hard - soft.detach() + soft).gather(1, cls[:, None]).squeeze(1)
        return cls, weight

    @torch.no_grad()
    def sample(self, batch: int, generator) -> torch.Tensor:
        return (self.phi + self.gumbel(batch, generator)).argmax(1)


class MetaSamplerTraining:
    """Stage-2 training of the classifier on backbone features, as engine.contract.Steps: an epoch is
    ceil(N / B) steps; each step a meta step of the sampling logits, then the classifier's Balanced
    Softmax loss on a batch from the updated pi (the trainer steps `opt`, which it holds as its
    optimizer). `features(idx)` gives the features of training samples idx (fresh per batch, or
    rows of a precomputed bank); `meta_features()` those of the meta set, whose labels are
    `meta_labels`. Stage-2 epoch e has cosine lr at e - first. phi and its Adam state go in the
    checkpoint."""

    def __init__(self, classifier: nn.Module, features: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                 meta_features: Callable[[], torch.Tensor], meta_labels: torch.Tensor, class_counts,
                 generator: torch.Generator, *, epochs: int, lr: float, batch_size: int, momentum: float,
                 weight_decay: float, meta_lr: float, temperature: float, init: str, first: int = 0):
        self.classifier, self.features, self.labels = classifier, features, labels
        self.meta_features, self.meta_labels = meta_features, meta_labels
        self.generator, self.epochs, self.lr_base, self.batch_size = generator, epochs, lr, batch_size
        self.first, self.current_lr, self.meta_losses = first, lr, []
        self.temperature = temperature
        device = labels.device
        counts = torch.tensor(class_counts, dtype=torch.long)
        self.counts = counts.to(device)
        self.log_prior = counts.float().log().to(device)
        # positions of each class's samples, class after class: sample k of class j is at starts[j] + k
        self.by_class = torch.argsort(labels, stable=True)
        self.starts = (torch.cumsum(counts, 0) - counts).to(device)
        self.sampler = ClassSampler(class_counts, init, device)
        self.meta_opt = torch.optim.Adam([self.sampler.phi], lr=meta_lr)
        self.opt = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=lr,
                                   momentum=momentum, weight_decay=weight_decay)

    def _instances(self, cls: torch.Tensor) -> torch.Tensor:
        u = torch.rand(len(cls), generator=self.generator).to(cls.device)
        k = (u * self.counts[cls]).long().clamp_max(self.counts[cls] - 1)
        return self.by_class[self.starts[cls] + k]

    def _bs(self, logits, y, reduction="mean"):
        return F.cross_entropy(logits + self.log_prior, y, reduction=reduction)

    def meta_step(self, lr: float) -> float:
        cls, weight = self.sampler.sample_straight_through(self.batch_size, self.generator, self.temperature)
        idx = self._instances(cls)
        params = {k: v for k, v in self.classifier.named_parameters() if v.requires_grad}
        logits = functional_call(self.classifier, params, (self.features(idx),))
        virtual = (weight * self._bs(logits, cls, "none")).mean()
        grads = torch.autograd.grad(virtual, list(params.values()), create_graph=True)
        updated = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
        meta_loss = F.cross_entropy(functional_call(self.classifier, updated, (self.meta_features(),)),
                                    self.meta_labels)
        (grad_phi,) = torch.autograd.grad(meta_loss, [self.sampler.phi])
        self.meta_opt.zero_grad(set_to_none=True)
        self.sampler.phi.grad = grad_phi
        self.meta_opt.step()
        return meta_loss.item()

    # -- engine.contract.Steps: one meta step then the real step's loss per batch --------------------
    def lr(self, epoch: int) -> float:
        self.current_lr = cosine_lr(self.lr_base, epoch - self.first, self.epochs)
        return self.current_lr

    def batches(self, epoch: int):
        self.meta_losses = []
        return range((len(self.labels) + self.batch_size - 1) // self.batch_size)

    def loss(self, _step) -> StepResult:
        self.meta_losses.append(self.meta_step(self.current_lr))
        cls = self.sampler.sample(self.batch_size, self.generator)
        idx = self._instances(cls)
        logits = self.classifier(self.features(idx))
        return StepResult(self._bs(logits, cls), logits, (logits.detach().argmax(1) == cls).sum(), len(cls))

    def state_dict(self) -> dict:
        return {"phi": self.sampler.phi.detach().clone(), "meta_opt": self.meta_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.sampler.phi.copy_(state["phi"])
        self.meta_opt.load_state_dict(state["meta_opt"])


class MetaSampler:
    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)

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
        meta_idx = balanced_subset(t.data.y_train_cpu, kw.pop("meta_per_class"), kw.pop("meta_seed"))
        meta_idx = meta_idx.to(t.data.y_train.device)
        augment, train_bn = kw.pop("augment"), kw.pop("bn") == "train"
        if augment or train_bn:  # the authors' way: frozen weights, fresh features every batch
            def features(idx):
                return extract_features(t, idx, augment, train_bn, whole_batch=True)

            def meta_features():
                return extract_features(t, meta_idx, augment, train_bn)
        else:  # eval-mode BatchNorm, no augmentation: the features never change, compute them once
            bank = extract_features(t)
            meta_bank = bank[meta_idx.to(bank.device)]

            def features(idx):
                return bank[idx]

            def meta_features():
                return meta_bank
        first, epochs = t.epoch, kw["epochs"]
        training = MetaSamplerTraining(clf, features, t.data.y_train, meta_features, t.data.y_train[meta_idx], counts,
                                       t.sample_gen, first=first, **kw)
        t.optimizer = training.opt
        t.reset_best()  # the stage-1 snapshot holds another classifier
        on_epoch, on_batch = epoch_logger(ctx, "meta_sampler", first, first + epochs)

        def log_epoch(row):
            on_epoch(row)
            if ctx.log is not None:
                rates = training.sampler.rates().tolist()
                meta = sum(training.meta_losses) / max(len(training.meta_losses), 1)
                ctx.log.log_metrics({"meta_loss": meta, **{f"sampler_rate/{j:03d}": r for j, r in enumerate(rates)}},
                                    step=row["epoch"] + 1)  # epoch numbers from 1

        ctx.fit(training, first + epochs, on_epoch=log_epoch, on_batch=on_batch)
        self.rates = training.sampler.rates().tolist()
        ctx.meta["meta_sampler_rates"] = self.rates
        print("finetune[meta_sampler]: learned class sampling rates "
              + " ".join(f"{r:.3f}" for r in self.rates) + f" (class counts {counts})")


def build_meta_sampler(*, epochs: int = 10, lr: float = 0.05, batch_size: int = 128, momentum: float = 0.9,
                       weight_decay: float = 5e-4, meta_lr: float = 0.01, temperature: float = 1.0,
                       meta_per_class: int = 10, meta_seed: int = 0, init: str = "instance",
                       reinit: bool = True, init_seed: int = 0, augment: bool = True,
                       bn: str = "train") -> MetaSampler:
    """Classifier schedule as cRT (10 epochs, SGD momentum 0.9, wd 5e-4, cosine lr from 0.05), a fresh
    classifier, augmented batches through the frozen backbone in train mode; Adam on the sampling
    logits; meta set = meta_per_class training images per class (capped at n_j)."""
    for key, v in (("epochs", epochs), ("batch_size", batch_size), ("meta_per_class", meta_per_class)):
        check_number(f"finetunes.meta_sampler.{key}", v, min=1, integer=True)
    for key, v in (("lr", lr), ("meta_lr", meta_lr), ("temperature", temperature)):
        check_number(f"finetunes.meta_sampler.{key}", v, above=0)
    for key, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        check_number(f"finetunes.meta_sampler.{key}", v, min=0)
    if init not in ("instance", "class_balanced"):
        raise LongtailError(f"finetunes.meta_sampler.init must be one of instance, class_balanced, got {init!r}")
    for key, v in (("reinit", reinit), ("augment", augment)):
        if not isinstance(v, bool):
            raise LongtailError(f"finetunes.meta_sampler.{key} must be true or false, got {v!r}")
    if bn not in BN_MODES:
        raise LongtailError(f"finetunes.meta_sampler.bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    return MetaSampler(epochs=epochs, lr=float(lr), batch_size=batch_size, momentum=float(momentum),
                       weight_decay=float(weight_decay), meta_lr=float(meta_lr), temperature=float(temperature),
                       meta_per_class=meta_per_class, meta_seed=meta_seed, init=init, reinit=reinit,
                       init_seed=init_seed, augment=augment, bn=bn)
