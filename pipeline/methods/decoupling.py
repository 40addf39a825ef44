"""Decoupling representation and classifier (Kang et al., ICLR 2020; docs/methods.md §4): fine-tune strategies of group
`longtail.finetune` that re-balance only the classifier of a model trained with plain
instance-balanced sampling over the whole schedule (stage 1: set finetune.start_epoch = train.epochs, and
finetune.reweighting = none).

- `crt`: re-initialise the classifier and retrain it on the frozen backbone with class-balanced
  sampling (cosine lr, 10 epochs by default).
- `tau_norm`: no training; w_j <- w_j / |w_j|^tau, bias dropped (head becomes `linear_nobias`).
  A sweep over a tau grid is scored on a class-balanced subset of the *training* set (never the
  test set); `tau: auto` takes the best tau of the sweep.
- `lws`: learn one scale f_j per class (z_j = f_j (w_j.x + b_j)) on the frozen backbone and frozen
  classifier with class-balanced sampling; the scales are folded into W and b at the end.
- `ncm`: nearest class mean of centred, L2-normalised features (the authors' default `cl2n`), as a
  `ncm` head (pipeline/models/heads.py).

The shared classifier-stage toolkit (frozen-backbone features, `ClassifierTraining`, BatchNorm and
epoch-size options) is pipeline/methods/classifier_stage.py.
finetune.reweighting / finetune.sampler are not used: each strategy names its own sampler (the check
refuses any but none / instance: uses_finetune_rebalancing = False).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from ..checks import check_number, check_seed
from ..errors import LongtailError
from ..models.heads import make_head
from .classifier_stage import (ClassifierTraining, _common, balanced_accuracy,
                               balanced_subset, extract_features, final_is_best, linear_classifier,
                               reinit_classifier, require_full_stage_one)

SWEEP_FILE = Path(".longtail/tau_sweep.json")
DEFAULT_TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # [0, 2], as the authors search


# -- cRT ------------------------------------------------------------------------------------------

class ClassifierRetraining:
    """cRT: a freshly initialised classifier of the same head kind (PyTorch's default linear-layer
    initialisation, as the authors' new classifier has), trained with the configured loss (CE in the paper),
    unweighted, on class-balanced batches from the frozen backbone."""

    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)
    uses_finetune_rebalancing = False  # its own sampler (finetunes.*), no class weights

    def __init__(self, training: ClassifierTraining, init_seed: int):
        self.training, self.init_seed = training, init_seed

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "crt")
        old = ctx.trainer.model.classifier
        num_classes, dim = old.weight.shape
        self.training.train(ctx, reinit_classifier(make_head(ctx.meta["head"], dim, num_classes), self.init_seed))


def build_crt(*, epochs: int = 10, lr: float = 0.05, batch_size: int = 128, momentum: float = 0.9,
              weight_decay: float = 5e-4, sampler: str = "class_aware", augment: bool = True,
              init_seed: int = 0, epoch_size: str = "dataset", bn: str = "train") -> ClassifierRetraining:
    """Defaults (Kang et al., ICLR 2020, §5 / appendix): 10 epochs, SGD momentum 0.9, weight decay
    5e-4, cosine lr; their lr 0.2 at batch 512 scaled linearly to this protocol's batch 128 -> 0.05.
    augment: true applies the training augmentation (crop/flip) to every batch, as the paper's
    stage 2 does; the frozen backbone then runs per batch (about a third of a training epoch's
    cost). false skips it; with `bn: eval` the features are then computed once and reused (fast,
    but the classifier sees the same 'clean' features of memorised training images every epoch).
    epoch_size: dataset = int(N / batch_size) batches an epoch (the authors' code counts its epoch in
    steps of the training set's size, not of the class-aware sampler's n_max x C), balanced = n_max x C
    samples.
    bn: train = the backbone in train mode, BatchNorm running statistics update (the authors' code);
    eval = they stay as stage 1 left them."""
    return ClassifierRetraining(_common("crt", sampler, epochs, lr, batch_size, momentum, weight_decay, augment,
                                        epoch_size, bn), check_seed("finetunes.crt.init_seed", init_seed))


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
    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)
    uses_finetune_rebalancing = False  # trains nothing: no batches, no class weights

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
        if self.sweep_file is not None:
            io.write_json(self.sweep_file, self.result)
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
        check_number("finetunes.tau_norm.tau", tau, min=0)
    if not isinstance(grid, (list, tuple)) or not grid:
        raise LongtailError(f"finetunes.tau_norm.grid must be a non-empty list of numbers >= 0, got {grid!r}")
    grid = [check_number(f"finetunes.tau_norm.grid[{i}]", v, min=0) for i, v in enumerate(grid)]
    check_number("finetunes.tau_norm.holdout_per_class", holdout_per_class, min=1, integer=True)
    check_seed("finetunes.tau_norm.holdout_seed", holdout_seed)
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
    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)
    uses_finetune_rebalancing = False  # its own sampler (finetunes.*), no class weights

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


def build_lws(*, epochs: int = 5, lr: float = 0.05, batch_size: int = 128, momentum: float = 0.9,
              weight_decay: float = 5e-4, sampler: str = "class_aware", augment: bool = True,
              epoch_size: str = "dataset", bn: str = "train") -> LearnableWeightScaling:
    """The options of cRT; 5 epochs and weight decay 5e-4 on the scales, as in the authors' LWS configs."""
    return LearnableWeightScaling(_common("lws", sampler, epochs, lr, batch_size, momentum, weight_decay, augment,
                                          epoch_size, bn))


# -- NCM ------------------------------------------------------------------------------------------

@torch.no_grad()
def class_means(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                center: torch.Tensor | None = None) -> torch.Tensor:
    """mu_j = mean of the L2-normalised features of class j (zeros for a class with no sample); with
    `center`, of the L2-normalised f - center (the means themselves are not normalised again)."""
    fn = F.normalize(feats if center is None else feats - center, dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, fn)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats)
    return sums / counts[:, None]


@torch.no_grad()
def ncm_head(means: torch.Tensor, metric: str = "euclidean", center: torch.Tensor | None = None) -> nn.Module:
    """A `ncm` head (z = W f^ + b, f^ = (f - c)/|f - c|, c = `center` or 0) whose argmax is the
    nearest class mean. euclidean: argmin_j |f^ - mu_j|^2 = argmax_j 2 f^.mu_j - |mu_j|^2 -> W = 2 mu,
    b = -|mu|^2. cosine: argmax_j cos(f^, mu_j) -> W = mu / |mu|, b = 0."""
    head = make_head("ncm", means.shape[1], means.shape[0]).to(means.device)
    if center is not None:
        head.center.copy_(center)
    if metric == "euclidean":
        head.weight.copy_(2 * means)
        head.bias.copy_(-(means * means).sum(1))
    else:
        head.weight.copy_(F.normalize(means, dim=1))
        head.bias.zero_()
    return head


class NearestClassMean:
    after_full_stage_one = True  # stage 1 must run the whole schedule (checked before any work)
    uses_finetune_rebalancing = False  # trains nothing: no batches, no class weights

    def __init__(self, metric: str, features: str):
        self.metric, self.features = metric, features

    def run(self, ctx) -> None:
        require_full_stage_one(ctx, "ncm")
        t = ctx.trainer
        feats = extract_features(t)
        center = feats.mean(0) if self.features == "cl2n" else None
        means = class_means(feats, t.data.y_train, len(ctx.meta["class_counts"]), center)
        t.model.classifier = ncm_head(means, self.metric, center)
        ctx.meta["head"] = "ncm"
        final_is_best(t)


NCM_FEATURES = ("cl2n", "l2n")


def build_ncm(*, metric: str = "euclidean", features: str = "cl2n") -> NearestClassMean:
    """features: cl2n (the authors' default: the mean of all training features, taken without
    augmentation, is subtracted, then each feature is L2-normalised) or l2n (L2-normalised only).
    metric: euclidean (distance to the class means, Kang et al.'s NCM) or cosine (cosine similarity to
    them)."""
    if metric not in ("euclidean", "cosine"):
        raise LongtailError(f"finetunes.ncm.metric must be one of euclidean, cosine, got {metric!r}")
    if features not in NCM_FEATURES:
        raise LongtailError(f"finetunes.ncm.features must be one of {', '.join(NCM_FEATURES)}, got {features!r}")
    return NearestClassMean(metric, features)
