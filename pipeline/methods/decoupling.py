"""Decoupling representation and classifier (Kang et al., ICLR 2020): fine-tune strategies of group
`longtail.finetune` that re-balance only the classifier of a model trained with plain
instance-balanced sampling over the whole schedule (stage 1: set finetune.start_epoch = train.epochs).

- `crt`: re-initialise the classifier and retrain it on the frozen backbone with class-balanced
  sampling (cosine lr, 10 epochs by default).
- `tau_norm`: no training; w_j <- w_j / |w_j|^tau, bias dropped (head becomes `linear_nobias`).
  A sweep over a tau grid is scored on a class-balanced subset of the *training* set (never the
  test set); `tau: auto` takes the best tau of the sweep.
- `lws`: learn one scale f_j per class (z_j = f_j (w_j.x + b_j)) on the frozen backbone and frozen
  classifier with class-balanced sampling; the scales are folded into W and b at the end.
- `ncm`: nearest class mean of L2-normalised features, as a `ncm` head (pipeline/models/heads.py).

The backbone's weights are frozen in every strategy (no_grad; only the classifier's parameters
reach an optimizer). In the training strategies (cRT, LWS) it stays in train mode by default, as in
the authors' code, so BatchNorm normalises with batch statistics and updates its running
statistics on the class-balanced stream (`bn: eval` keeps them instead). An epoch of their
class-aware sampler has n_max x C samples (`epoch_size: balanced`; `dataset` gives N).
The model contract (`.features(x)`, `.classifier` with `weight[C, d]`) is all they rely on.
finetune.reweighting / finetune.sampler are not used: each strategy names its own sampler.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..data.augment import augment, normalize
from ..engine.contract import StepResult
from ..engine.progress import Progress
from ..errors import LongtailError
from ..models.heads import make_head

SWEEP_FILE = Path(".longtail/tau_sweep.json")
DEFAULT_TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # [0, 2], as the authors search
EPOCH_SIZES = ("balanced", "dataset")
BN_MODES = ("train", "eval")


# -- helpers shared by the classifier-only strategies (also used by meta_sampler) -----------------

def require_full_stage_one(ctx, name: str) -> None:
    """Stage 2 of decoupling starts after the whole stage-1 schedule."""
    if ctx.trainer.epoch < ctx.until:
        raise LongtailError(
            f"finetune.strategy={name} re-trains only the classifier after stage 1 has run the whole schedule: "
            f"set finetune.start_epoch to train.epochs ({ctx.params.train.epochs}), not "
            f"{ctx.params.finetune.start_epoch}")


def linear_classifier(ctx, name: str) -> nn.Linear:
    clf = ctx.trainer.model.classifier
    if not isinstance(clf, nn.Linear):
        raise LongtailError(f"finetune.strategy={name} needs a linear classifier (a loss with head 'linear', "
                            f"e.g. ce or balanced_softmax); this model's head is {ctx.meta.get('head')!r}")
    return clf


def _autocast(trainer):
    return trainer.autocast() if hasattr(trainer, "autocast") else nullcontext()


@torch.no_grad()
def extract_features(trainer, idx: torch.Tensor | None = None, augmented: bool = False,
                     train_mode: bool = False) -> torch.Tensor:
    """Backbone features (`model.features`) of training images (all, or those at `idx`), float32.
    The model is put in eval mode (BatchNorm uses its running statistics and does not update them),
    or with `train_mode` in train mode (batch statistics; the running statistics update).
    Never touches the test set. With `augmented`, the training augmentation (trainer.pad / flip,
    trainer.aug_gen) is applied first."""
    d, model = trainer.data, trainer.model
    model.train(train_mode)
    x_all = d.x_train if idx is None else d.x_train[idx.to(d.x_train.device)]
    out = []
    for i in range(0, len(x_all), trainer.cfg.eval_batch_size):
        x = x_all[i:i + trainer.cfg.eval_batch_size]
        if augmented:
            x = augment(x, trainer.pad, trainer.flip, trainer.aug_gen)
        x = normalize(x, d.mean, d.std)
        if getattr(trainer, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(trainer):
            out.append(model.features(x).float())
    if not out:
        return torch.zeros(0, 0, device=trainer.device)
    return torch.cat(out)


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
            ctx.log.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    on_batch = progress.batch if ctx.fit_kwargs.get("on_batch") is not None else None
    return on_epoch, on_batch


def epoch_order(sampler, labels: torch.Tensor, epoch: int, epochs: int, generator, size: int) -> torch.Tensor:
    """`size` samples of the sampler: its orders for one epoch concatenated (drawn with the same
    generator, one call after another) and cut at `size`. For a sampler with replacement this is
    `size` draws from its class distribution."""
    parts, total = [], 0
    while total < size:
        parts.append(sampler.indices(labels, epoch, epochs, generator))
        total += len(parts[-1])
    return torch.cat(parts)[:size]


def cosine_lr(lr: float, i: int, epochs: int) -> float:
    """Cosine annealing from lr (stage-2 epoch i = 0) towards 0 (Kang et al. use a cosine schedule)."""
    return lr * 0.5 * (1 + math.cos(math.pi * i / epochs))


def final_is_best(trainer) -> None:
    """For a strategy that does not train: best = the final (transformed) model, at the last epoch."""
    trainer.best = {"epoch": trainer.epoch - 1, "test_acc": -1.0, "model": None}


def _check_positive(name: str, key: str, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value <= 0:
        raise LongtailError(f"finetunes.{name}.{key} must be a positive {'integer' if integer else 'number'}, "
                            f"got {value!r}")
    return value


def _check_nonneg(name: str, key: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise LongtailError(f"finetunes.{name}.{key} must be a number >= 0, got {value!r}")
    return float(value)


class ClassifierTraining:
    """Train `head` (and nothing else) on backbone features for `epochs` stage-2 epochs: the trainer
    runs its `ClassifierSteps` (evaluation, history, best tracking and checkpoints are the usual ones).
    Epochs are numbered on from the stage-1 end: [trainer.epoch, trainer.epoch + epochs)."""

    def __init__(self, name: str, sampler: str, epochs: int, lr: float, batch_size: int, momentum: float,
                 weight_decay: float, augment: bool, epoch_size: str = "balanced", bn: str = "train"):
        self.name, self.sampler_name = name, sampler
        self.epochs = _check_positive(name, "epochs", epochs, integer=True)
        self.lr = float(_check_positive(name, "lr", lr))
        self.batch_size = _check_positive(name, "batch_size", batch_size, integer=True)
        self.momentum = _check_nonneg(name, "momentum", momentum)
        self.weight_decay = _check_nonneg(name, "weight_decay", weight_decay)
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
        size = max(counts) * len(counts) if self.epoch_size == "balanced" else sum(counts)
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
            feats = extract_features(t, idx, self.c.augment, self.train_bn)
        y = t.data.y_train[idx]
        logits = self.head(feats)
        loss = t.loss(logits, y, None, feats)
        return StepResult(loss, logits, (logits.detach().argmax(1) == y).sum(), len(idx))


def _common(name, sampler, epochs, lr, batch_size, momentum, weight_decay, augment, epoch_size, bn):
    return ClassifierTraining(name, sampler, epochs, lr, batch_size, momentum, weight_decay, augment, epoch_size, bn)


# -- cRT ------------------------------------------------------------------------------------------

class ClassifierRetraining:
    """cRT: a freshly initialised classifier of the same head kind (Kaiming-normal weights, as the
    architecture initialises it; zero bias), trained with the configured loss (CE in the paper),
    unweighted, on class-balanced batches from the frozen backbone."""

    def __init__(self, training: ClassifierTraining, init_seed: int):
        self.training, self.init_seed = training, init_seed

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "crt")
        old = ctx.trainer.model.classifier
        num_classes, dim = old.weight.shape
        head = make_head(ctx.meta["head"], dim, num_classes)
        g = torch.Generator().manual_seed(self.init_seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * math.sqrt(2.0 / dim))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
        self.training.train(ctx, head)


def build_crt(*, epochs: int = 10, lr: float = 0.05, batch_size: int = 128, momentum: float = 0.9,
              weight_decay: float = 5e-4, sampler: str = "class_balanced", augment: bool = True,
              init_seed: int = 0, epoch_size: str = "balanced", bn: str = "train") -> ClassifierRetraining:
    """Defaults (Kang et al., ICLR 2020, §5 / appendix): 10 epochs, SGD momentum 0.9, weight decay
    5e-4, cosine lr; their lr 0.2 at batch 512 scaled linearly to this protocol's batch 128 -> 0.05.
    augment: true applies the training augmentation (crop/flip) to every batch, as the paper's
    stage 2 does; the frozen backbone then runs per batch (about a third of a training epoch's
    cost). false skips it; with `bn: eval` the features are then computed once and reused (fast,
    but the classifier sees the same 'clean' features of memorised training images every epoch).
    epoch_size: balanced = n_max x C samples an epoch (the authors' class-aware sampler), dataset = N.
    bn: train = the backbone in train mode, BatchNorm running statistics update (the authors' code);
    eval = they stay as stage 1 left them."""
    return ClassifierRetraining(_common("crt", sampler, epochs, lr, batch_size, momentum, weight_decay, augment,
                                        epoch_size, bn), init_seed)


# -- tau-normalisation ----------------------------------------------------------------------------

def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_j / |w_j|^tau for every row j (tau = 0: unchanged, tau = 1: unit-norm rows)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


@torch.no_grad()
def tau_sweep(trainer, weight: torch.Tensor, grid, holdout_idx: torch.Tensor) -> list[dict]:
    """Accuracy of the bias-free tau-normalised classifier for each tau of `grid`, on the training
    images at `holdout_idx` (features without augmentation, backbone in eval mode). Reads only the
    training set. balanced_acc = mean per-class accuracy; acc = plain accuracy."""
    feats = extract_features(trainer, holdout_idx)
    y = trainer.data.y_train[holdout_idx.to(trainer.data.y_train.device)]
    out = []
    for tau in grid:
        pred = (feats @ tau_normalize(weight.to(feats), tau).t()).argmax(1)
        out.append({"tau": float(tau), "balanced_acc": balanced_accuracy(pred, y, weight.shape[0]),
                    "acc": (pred == y).float().mean().item() if len(y) else float("nan")})
    return out


def pick_tau(sweep: list[dict]) -> float:
    """The tau with the best balanced accuracy; ties go to the largest tau (the sweep set is made of
    training images stage 1 has fitted, which understates the head bias, so prefer more normalisation)."""
    best = max(r["balanced_acc"] for r in sweep)
    return max(r["tau"] for r in sweep if r["balanced_acc"] >= best - 1e-12)


class TauNorm:
    def __init__(self, tau, grid, holdout_per_class: int, holdout_seed: int, sweep_file):
        self.tau, self.grid = tau, grid
        self.holdout_per_class, self.holdout_seed = holdout_per_class, holdout_seed
        self.sweep_file = Path(sweep_file) if sweep_file else None
        self.result: dict | None = None

    def run(self, ctx) -> dict:
        require_full_stage_one(ctx, "tau_norm")
        t = ctx.trainer
        clf = linear_classifier(ctx, "tau_norm")
        weight = clf.weight.detach().clone()
        holdout = balanced_subset(t.data.y_train_cpu, self.holdout_per_class, self.holdout_seed)
        sweep = tau_sweep(t, weight, self.grid, holdout)
        tau = pick_tau(sweep) if self.tau == "auto" else float(self.tau)
        self.result = {
            "tau": tau, "tau_param": self.tau, "sweep": sweep,
            "holdout": {"images": len(holdout), "per_class": self.holdout_per_class, "seed": self.holdout_seed,
                        "source": "training set (class-balanced subset, capped at n_j; stage 1 trained on "
                                  "these images, so the scores are optimistic)"},
        }
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.device)
        with torch.no_grad():
            head.weight.copy_(tau_normalize(weight, tau))
        t.model.classifier = head
        ctx.meta["head"] = "linear_nobias"
        ctx.meta["tau_norm"] = self.result
        final_is_best(t)
        if ctx.log is not None:
            for r in sweep:
                step = int(round(100 * r["tau"]))
                ctx.log.log_metrics({"tau_sweep/balanced_acc": r["balanced_acc"], "tau_sweep/acc": r["acc"]},
                                    step=step)
            ctx.log.log_metrics({"tau": tau})
        text = json.dumps(self.result, indent=2)
        if self.sweep_file is not None:
            self.sweep_file.parent.mkdir(parents=True, exist_ok=True)
            self.sweep_file.write_text(text + "\n")
            if ctx.log is not None:
                ctx.log.log_artifact(self.sweep_file, "tau_norm")
        print("finetune[tau_norm]: balanced accuracy on a class-balanced subset of the training set: "
              + ", ".join(f"tau {r['tau']:g}: {100 * r['balanced_acc']:.2f}%" for r in sweep)
              + f" -> tau = {tau:g}" + (f" (sweep written to {self.sweep_file})" if self.sweep_file else ""))
        return self.result


def build_tau_norm(*, tau=1.0, grid=DEFAULT_TAU_GRID, holdout_per_class: int = 20, holdout_seed: int = 0,
                   sweep_file: str | None = str(SWEEP_FILE)) -> TauNorm:
    """tau: a number >= 0, or "auto" (the best of the sweep). Default 1 (Kang et al.: tau = 1 is plain
    L2 normalisation; they pick tau in (0, 1) on a validation set, which CIFAR-LT does not have).
    grid: the taus of the sweep (default 0, 0.1, ..., 2, the authors' range). holdout_per_class: images per class of the
    sweep set (a class-balanced subset of the training set; classes with fewer give all of theirs)."""
    if tau != "auto":
        try:
            tau = float(tau)
        except (TypeError, ValueError):
            raise LongtailError(f"finetunes.tau_norm.tau must be a number >= 0 or auto, got {tau!r}") from None
        _check_nonneg("tau_norm", "tau", tau)
    if not isinstance(grid, (list, tuple)) or not grid:
        raise LongtailError(f"finetunes.tau_norm.grid must be a non-empty list of numbers >= 0, got {grid!r}")
    grid = [_check_nonneg("tau_norm", "grid[]", v) for v in grid]
    _check_positive("tau_norm", "holdout_per_class", holdout_per_class, integer=True)
    if isinstance(holdout_seed, bool) or not isinstance(holdout_seed, int):
        raise LongtailError(f"finetunes.tau_norm.holdout_seed must be an integer, got {holdout_seed!r}")
    return TauNorm(tau, grid, holdout_per_class, holdout_seed, sweep_file)


# -- LWS ------------------------------------------------------------------------------------------

class ScaledClassifier(nn.Module):
    """z_j = f_j (w_j . x + b_j) with the linear layer frozen and f (init 1) the only parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(linear.out_features, device=linear.weight.device))

    @property
    def weight(self):  # the effective W (what losses that need |w_j| see)
        return self.scale[:, None] * self.linear.weight

    def forward(self, x):
        return self.scale * self.linear(x)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """The equivalent plain linear layer: W' = diag(f) W, b' = f * b."""
        out = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.linear.bias is not None)
        out = out.to(self.linear.weight.device)
        out.weight.copy_(self.scale[:, None] * self.linear.weight)
        if out.bias is not None:
            out.bias.copy_(self.scale * self.linear.bias)
        return out


def fold_state(state: dict, prefix: str = "classifier.") -> dict:
    """A model state dict holding a ScaledClassifier at `prefix` -> the same with the equivalent
    nn.Linear there (W' = diag(f) W, b' = f * b), loadable into the model with a plain linear head."""
    state = dict(state)
    scale = state.pop(f"{prefix}scale")
    weight = state.pop(f"{prefix}linear.weight")
    bias = state.pop(f"{prefix}linear.bias", None)
    state[f"{prefix}weight"] = scale[:, None] * weight
    if bias is not None:
        state[f"{prefix}bias"] = scale * bias
    return state


class LearnableWeightScaling:
    def __init__(self, training: ClassifierTraining):
        self.training = training
        self.scales: torch.Tensor | None = None

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "lws")
        t = ctx.trainer
        scaled = ScaledClassifier(linear_classifier(ctx, "lws"))
        self.training.train(ctx, scaled)
        self.scales = scaled.scale.detach().cpu().clone()
        t.model.classifier = scaled.folded()
        if t.best["model"] is not None:
            t.best["model"] = fold_state(t.best["model"])
        ctx.meta["lws_scales"] = self.scales.tolist()
        if ctx.log is not None:
            ctx.log.log_metrics({f"lws_scale/{j:03d}": float(s) for j, s in enumerate(self.scales)})


def build_lws(*, epochs: int = 10, lr: float = 0.05, batch_size: int = 128, momentum: float = 0.9,
              weight_decay: float = 5e-4, sampler: str = "class_balanced", augment: bool = True,
              epoch_size: str = "balanced", bn: str = "train") -> LearnableWeightScaling:
    """Same schedule and options as cRT, weight decay 5e-4 on the scales, as in the authors' LWS config."""
    return LearnableWeightScaling(_common("lws", sampler, epochs, lr, batch_size, momentum, weight_decay, augment,
                                          epoch_size, bn))


# -- NCM ------------------------------------------------------------------------------------------

@torch.no_grad()
def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mu_j = mean of the L2-normalised features of class j (zeros for a class with no sample)."""
    fn = F.normalize(feats, dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, fn)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats)
    return sums / counts[:, None]


@torch.no_grad()
def ncm_head(means: torch.Tensor, metric: str = "euclidean") -> nn.Module:
    """A `ncm` head (z = W f/|f| + b) whose argmax is the nearest class mean. euclidean:
    argmin_j |f^ - mu_j|^2 = argmax_j 2 f^.mu_j - |mu_j|^2 -> W = 2 mu, b = -|mu|^2.
    cosine: argmax_j cos(f, mu_j) -> W = mu / |mu|, b = 0."""
    head = make_head("ncm", means.shape[1], means.shape[0]).to(means.device)
    if metric == "euclidean":
        head.weight.copy_(2 * means)
        head.bias.copy_(-(means * means).sum(1))
    else:
        head.weight.copy_(F.normalize(means, dim=1))
        head.bias.zero_()
    return head


class NearestClassMean:
    def __init__(self, metric: str):
        self.metric = metric

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "ncm")
        t = ctx.trainer
        feats = extract_features(t)
        means = class_means(feats, t.data.y_train, len(ctx.meta["class_counts"]))
        t.model.classifier = ncm_head(means, self.metric)
        ctx.meta["head"] = "ncm"
        final_is_best(t)


def build_ncm(*, metric: str = "euclidean") -> NearestClassMean:
    """metric: euclidean (distance to the means of the L2-normalised features, Kang et al.'s NCM) or
    cosine (cosine similarity to the means)."""
    if metric not in ("euclidean", "cosine"):
        raise LongtailError(f"finetunes.ncm.metric must be one of euclidean, cosine, got {metric!r}")
    return NearestClassMean(metric)
