"""The classifier-stage toolkit shared by the decoupling strategies (pipeline/methods/decoupling.py)
and Balanced Meta-Softmax's stage 2 (meta_sampler.py; their recipes: docs/methods.md §4): stage-1
checks, frozen-backbone features, class-balanced subsets, the classifier re-initialisation, and
`ClassifierTraining`, which trains a new or rescaled classifier on the frozen backbone through the
trainer's `Steps` contract.

The backbone's weights are frozen (no_grad; only the classifier's parameters reach an optimizer).
In training it stays in train mode by default, as in the authors' code, so BatchNorm normalises with
batch statistics and updates its running statistics on the class-balanced stream (`bn: eval` keeps
them instead); each training batch then goes through the backbone whole, so that BatchNorm sees the
batch the classifier trains on. An epoch is the authors' one, floor(N / batch_size) batches of the
sampler (`epoch_size: dataset`; `balanced` gives n_max x C samples). The model contract (`.features(x)`, `.classifier` with `weight[C, d]`) is all it
relies on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import registry
from ..checks import check_number
from ..engine.contract import StepResult, sample_order
from ..engine.progress import Progress
from ..errors import LongtailError, full_stage_one_error

EPOCH_SIZES = ("balanced", "dataset")
BN_MODES = ("train", "eval")


def require_full_stage_one(ctx, name: str) -> None:
    """Stage 2 of decoupling starts after the whole stage-1 schedule. (A strategy that needs this also sets
    `after_full_stage_one = True`, so that `longtail check` and every stage's start refuse the schedule
    before any training.)"""
    if ctx.trainer.epoch < ctx.until:
        raise full_stage_one_error(name, ctx.params.train.epochs, ctx.params.finetune.start_epoch)


def linear_classifier(ctx, name: str) -> nn.Linear:
    clf = ctx.trainer.model.classifier
    if not isinstance(clf, nn.Linear):
        raise LongtailError(f"finetune.strategy={name} needs a linear classifier (a loss with head 'linear', "
                            f"e.g. ce or balanced_softmax); this model's head is {ctx.meta.get('head')!r}")
    return clf


def extract_features(trainer, idx: torch.Tensor | None = None, augmented: bool = False,
                     train_mode: bool = False, whole_batch: bool = False) -> torch.Tensor:
    """Backbone features (`model.features`) of training images (all, or those at `idx`), float32.
    The model is put in eval mode (BatchNorm uses its running statistics and does not update them),
    or with `train_mode` in train mode (batch statistics; the running statistics update).
    With `whole_batch` the images at `idx` go through the backbone as one batch (a training batch in
    train mode: BatchNorm's batch statistics are then those of the batch, not of evaluation-size
    pieces of it). Never touches the test set. With `augmented`, the
    training augmentation (`trainer.augment`) is applied first."""
    d, model = trainer.data, trainer.model
    model.train(train_mode)
    x_all = d.x_train if idx is None else d.x_train[idx.to(d.x_train.device)]
    out = trainer.infer(lambda x: model.features(x).float(), x_all, trainer.augment if augmented else None,
                        batch_size=len(x_all) if whole_batch and len(x_all) else None)
    return torch.zeros(0, 0, device=trainer.device) if out is None else out


@torch.no_grad()
def reinit_classifier(head: nn.Module, seed: int) -> nn.Module:
    """A fresh classifier as the authors' stage 2 gets one (their new `nn.Linear`, PyTorch's default
    initialisation): weights and bias uniform in [-1/sqrt(d), 1/sqrt(d)], drawn from a CPU generator
    seeded with `seed`; in place, returned."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(head.weight.shape[1])

    def uniform(shape):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    head.weight.copy_(uniform(head.weight.shape))
    if getattr(head, "bias", None) is not None:
        head.bias.copy_(uniform(head.bias.shape))
    return head


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A deterministic, class-balanced subset of the training set: for each class, the first
    min(per_class, n_j) of its sample positions in a permutation drawn from `seed` (CPU).
    Returns sorted int64 positions into `labels` (a CPU tensor)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    parts = []
    for j in range(int(labels.max()) + 1 if len(labels) else 0):
        members = torch.nonzero(labels == j).flatten()
        parts.append(members[torch.randperm(len(members), generator=g)][:per_class])
    return torch.cat(parts).sort().values if parts else torch.zeros(0, dtype=torch.long)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in `y` of the per-class accuracy."""
    accs = [(pred[y == j] == j).float().mean().item() for j in range(num_classes) if (y == j).any()]
    return sum(accs) / len(accs) if accs else float("nan")


def sampler_params(ctx, name: str) -> dict:
    return dict(((ctx.params.raw.get("samplers") or {}).get(name)) or {})


def build_sampler(ctx, name: str):
    return registry.build("samplers", name, ctx.meta["class_counts"], params=sampler_params(ctx, name),
                          param_key=f"samplers.{name}")


def epoch_logger(ctx, name: str, first: int, last: int):
    """on_epoch / on_batch callbacks for a stage-2 run of epochs [first, last): a progress line per
    epoch and the row's metrics to MLflow (step = epoch), as the stage's own callback does."""
    progress = Progress(f"finetune[{name}]", first, last, last)

    def on_epoch(row):
        progress.epoch(row)
        if ctx.log is not None:
            ctx.log.log_epoch(row)

    on_batch = progress.batch if ctx.fit_kwargs.get("on_batch") is not None else None
    return on_epoch, on_batch


def epoch_order(sampler, labels: torch.Tensor, epoch: int, epochs: int, generator, size: int) -> torch.Tensor:
    """`size` samples of the sampler: its orders for one epoch concatenated (drawn with the same
    generator, one call after another) and cut at `size`. For a sampler with replacement this is
    `size` draws from its class distribution."""
    parts, total = [], 0
    while total < size:
        parts.append(sample_order(sampler, labels, epoch, epochs, generator))
        total += len(parts[-1])
    return torch.cat(parts)[:size]


def cosine_lr(lr: float, i: int, epochs: int) -> float:
    """Cosine annealing from lr (stage-2 epoch i = 0) towards 0 (Kang et al. use a cosine schedule)."""
    return lr * 0.5 * (1 + math.cos(math.pi * i / epochs))


def final_is_best(trainer) -> None:
    """For a strategy that does not train: best = the final (transformed) model, at the last epoch."""
    trainer.best = {"epoch": trainer.epoch - 1, "test_acc": -1.0, "model": None}


class ClassifierTraining:
    """Train `head` (and nothing else) on backbone features for `epochs` stage-2 epochs: the trainer
    runs its `ClassifierSteps` (evaluation, history, best tracking and checkpoints are the usual ones).
    Epochs are numbered on from the stage-1 end: [trainer.epoch, trainer.epoch + epochs)."""

    def __init__(self, name: str, sampler: str, epochs: int, lr: float, batch_size: int, momentum: float,
                 weight_decay: float, augment: bool, epoch_size: str = "dataset", bn: str = "train"):
        self.name, self.sampler_name = name, sampler
        key = f"finetunes.{name}."
        if not isinstance(sampler, str):  # check_plugins checks the name of a string (finetunes.crt.sampler)
            raise LongtailError(f"{key}sampler must be a plugin name, got {sampler!r}")
        self.epochs = check_number(key + "epochs", epochs, min=1, integer=True)
        self.lr = check_number(key + "lr", lr, above=0)
        self.batch_size = check_number(key + "batch_size", batch_size, min=1, integer=True)
        self.momentum = check_number(key + "momentum", momentum, min=0)
        self.weight_decay = check_number(key + "weight_decay", weight_decay, min=0)
        if not isinstance(augment, bool):
            raise LongtailError(f"finetunes.{name}.augment must be true or false, got {augment!r}")
        self.augment = augment
        if epoch_size not in EPOCH_SIZES:
            raise LongtailError(f"finetunes.{name}.epoch_size must be one of {', '.join(EPOCH_SIZES)}, got {epoch_size!r}")
        if bn not in BN_MODES:
            raise LongtailError(f"finetunes.{name}.bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
        self.epoch_size, self.bn = epoch_size, bn

    def train(self, ctx, head: nn.Module) -> None:
        t = ctx.trainer
        t.model.classifier = head.to(t.device)
        params = [p for p in head.parameters() if p.requires_grad]
        # the checkpoint then holds the optimizer that trains stage 2
        t.optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        first = t.epoch
        counts = ctx.meta["class_counts"]
        # the authors' epoch: int(N / batch_size) batches, however many the sampler could give
        size = (max(counts) * len(counts) if self.epoch_size == "balanced"
                else max(sum(counts) // self.batch_size, 1) * self.batch_size)
        steps = ClassifierSteps(self, t, head, build_sampler(ctx, self.sampler_name), first, size)
        t.reset_best()  # the stage-1 snapshot holds another classifier
        on_epoch, on_batch = epoch_logger(ctx, self.name, first, first + self.epochs)
        ctx.fit(steps, first + self.epochs, on_epoch=on_epoch, on_batch=on_batch)


class ClassifierSteps:
    """engine.contract.Steps of a classifier-only stage 2: cosine lr over the stage-2 epochs, `size`
    samples of the sampler per epoch, features of the frozen backbone, the configured loss."""

    def __init__(self, training: ClassifierTraining, trainer, head, sampler, first: int, size: int):
        self.c, self.t, self.head, self.sampler, self.first, self.size = training, trainer, head, sampler, first, size
        self.train_bn = training.bn == "train"
        # no augmentation and fixed BatchNorm statistics: the features are computed once
        self.bank = None if (training.augment or self.train_bn) else extract_features(trainer)

    def lr(self, epoch: int) -> float:
        return cosine_lr(self.c.lr, epoch - self.first, self.c.epochs)

    def batches(self, epoch: int):
        t, bs = self.t, self.c.batch_size
        order = epoch_order(self.sampler, t.data.y_train_cpu, epoch - self.first, self.c.epochs, t.sample_gen,
                            self.size).to(t.device)
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def loss(self, idx) -> StepResult:
        t = self.t
        if self.bank is not None:
            feats = self.bank[idx]
        else:
            feats = extract_features(t, idx, self.c.augment, self.train_bn, whole_batch=True)
        y = t.data.y_train[idx]
        logits = self.head(feats)
        loss = t.loss(logits, y, None, feats)
        return StepResult(loss, logits, (logits.detach().argmax(1) == y).sum(), len(idx))


def _common(name, sampler, epochs, lr, batch_size, momentum, weight_decay, augment, epoch_size, bn):
    return ClassifierTraining(name, sampler, epochs, lr, batch_size, momentum, weight_decay, augment, epoch_size, bn)
