"""The plugin kit: what a `longtail` plugin may import (a small, stable, documented surface).

    from pipeline.plugin_kit import LongtailError, check_number, weighted_ce, check_loss_plugin

Everything else in `pipeline` is internal and may change. The built-in losses use these same helpers.

The loss plugin contract (checked by ``check_loss_plugin``):

- Registration: an entry point in the "longtail.losses" group, ``name = "pkg.module:build"``.
- ``build(class_counts: list[int], **params) -> torch.nn.Module``. params come from params.yaml
  ``losses.<name>``, keyword-only with defaults; an unknown key is a TypeError (the caller turns it
  into a user error); a bad value raises LongtailError with one line naming ``losses.<name>.<param>``
  and the valid values (``check_number`` does that for numbers).
- ``module.head`` says which classifier the model gets: "linear" (z = W x + b), "linear_nobias"
  (z = W x) or "cosine" (z_j = cos(x, W_j) in [-1, 1]; a scale s is applied inside the loss).
  Where a loss is built (``longtail check``, sweep and every stage alike: ``registry.build``), a
  build that returns None or a head outside LOSS_HEADS is refused in one line naming the plugin.
- ``module(logits[B, C], target[B], class_weight=None)`` returns the batch-mean loss: a finite
  scalar, differentiable w.r.t. logits, which it must not modify in place. The trainer checks this
  on every call (``engine.trainer.check_loss_output``: a per-sample vector or a detached number is
  one line naming the plugin, at the first batch, before any update or checkpoint). ``class_weight`` (float
  [C], from re-weighting / DRW) gives the weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i}
  (``weighted_mean``, PyTorch's weighted cross-entropy); class_weight = ones must equal no weight.
  (The documented exceptions: the built-in focal loss's default "reference" weighting, and the
  sigmoid focal loss, which divides sum_i w_{y_i} l_i by the batch size, as Cui et al.'s code does.)
- Optional ``module.set_epoch(epoch, epochs)``: the trainer calls it at the start of every epoch.
- Optional ``module.init_classifier(classifier)``: called once on a newly built model's classifier
  (an ``nn.Linear`` for the linear heads), before any checkpoint is loaded into it; e.g. the sigmoid
  focal loss starts every class's bias at -log(C - 1).
- Optional ``module.extra_inputs``: a tuple of names from ``EXTRA_INPUTS`` = ("features", "weight").
  The trainer then passes them as keywords, ``module(logits, target, class_weight=None,
  features=x, weight=W)``: x[B, D] is the classifier's input and W[C, D] its weight, both attached
  to the graph, so a loss can use |W_j| and |x| (L-Softmax does). Such a loss needs a model with
  ``features`` and ``classifier`` (the built-in ResNets) and runs in one process (not torchrun).
- State that must survive a resume (e.g. a step counter) lives in buffers: the trainer saves and
  loads ``module.state_dict()`` with every checkpoint.
"""

import torch
import torch.nn.functional as F

from pipeline.checks import check_number  # the project's one number validator
from pipeline.errors import LongtailError
from pipeline.registry import LOSS_HEADS  # the heads a loss may declare (checked where a loss is built)
from pipeline.testing import check_loss_plugin

__all__ = ["EXTRA_INPUTS", "LOSS_HEADS", "LongtailError", "check_counts", "check_loss_plugin", "check_number", "hardest_negative",
           "ldam_margins", "shift_target", "weighted_ce", "weighted_mean"]

EXTRA_INPUTS = ("features", "weight")


def weighted_mean(per_sample, target, class_weight=None):
    """mean_i l_i, or sum_i w_{y_i} l_i / sum_i w_{y_i} when class_weight is given."""
    if class_weight is None:
        return per_sample.mean()
    w = class_weight.to(per_sample)[target]
    return (w * per_sample).sum() / w.sum()


def weighted_ce(logits, target, class_weight=None):
    """Softmax cross-entropy with PyTorch's weighted mean (equals F.cross_entropy(weight=w))."""
    return weighted_mean(F.cross_entropy(logits, target, reduction="none"), target, class_weight)


def shift_target(logits, target, delta):
    """z - delta_i e_{y_i}: subtract a per-sample margin delta[B] from each row's target logit."""
    return logits - delta.to(logits)[:, None] * F.one_hot(target, logits.shape[1]).to(logits)


def hardest_negative(logits, target):
    """max_{j != y_i} z_ij for each row."""
    is_target = F.one_hot(target, logits.shape[1]).bool()
    return logits.masked_fill(is_target, float("-inf")).amax(dim=1)


def ldam_margins(class_counts, max_m):
    """Delta_j = K / n_j^(1/4), K chosen so that max_j Delta_j = max_m (Cao et al., NeurIPS 2019). Float64 [C]."""
    m = torch.tensor(class_counts, dtype=torch.float64).pow(-0.25)
    return m * (max_m / m.max())


def check_counts(loss, class_counts):
    """Losses that use n_j need every class to have at least one training image."""
    bad = [j for j, n in enumerate(class_counts) if not n >= 1]
    if not class_counts or bad:
        raise LongtailError(
            f"losses.{loss} needs at least one training image per class "
            f"(class counts {list(class_counts)}, empty classes {bad})"
        )
    return [int(n) for n in class_counts]
