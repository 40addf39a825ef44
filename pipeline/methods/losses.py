"""Built-in loss plugins (formulas: docs methods.md section 2).

The contract every loss plugin honours (checked by pipeline.testing.check_loss_plugin):

- ``build(class_counts: list[int], **params) -> torch.nn.Module``; params come from params.yaml
  ``losses.<name>``. An unknown keyword is a TypeError (the caller turns it into a user error);
  a value out of range raises LongtailError naming ``losses.<name>.<param>`` and what is valid.
- ``module.head`` is "linear" (plain logits z = W x) or "cosine" (z_j = cos(x, W_j) in [-1, 1];
  the scale s is applied inside the loss).
- ``module(logits[B, C], target[B], class_weight=None)`` returns the batch-mean loss, a scalar.
  ``class_weight`` (float [C], from re-weighting / DRW) gives the weighted mean
  sum_i w_{y_i} l_i / sum_i w_{y_i} (PyTorch's weighted cross-entropy), for every loss here.
- optional ``module.set_epoch(epoch, epochs)``: the trainer calls it at the start of every epoch.
- optional ``module.needs_norms = True`` (only lsoftmax): the head must be a bias-free linear layer
  and the trainer calls ``module(logits, target, class_weight=None, norms=(w_norm, x_norm))`` with
  w_norm[C] = |W_j| and x_norm[B] = |x_i|, both still attached to the graph (not detached), so
  that the loss is the paper's function of W and x and its gradient is the paper's gradient.

The helpers at the top (weighted_mean, weighted_ce, shift_target, hardest_negative, ldam_margins,
check_number, check_counts) are public so that plugin packages (e.g. longtail-mm) can reuse them.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.checks import check_number  # noqa: F401  the one number validator (re-exported for plugins)
from pipeline.errors import LongtailError

# -----------------------------------------------------------------------------
# shared pieces


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


# -----------------------------------------------------------------------------
# the loss modules (several losses share one module with different constants)


class CrossEntropy(nn.Module):
    """Softmax cross-entropy (ERM); class-weighted mean when class_weight is given."""

    head = "linear"

    def forward(self, logits, target, class_weight=None):
        return weighted_ce(logits, target, class_weight)


class Focal(nn.Module):
    """Focal loss, Lin et al., ICCV 2017: FL_i = -(1 - p_t)^gamma log p_t, p_t = softmax(z)_y.

    class_weight convention: alpha_t = w_{y_i} multiplies each sample's focal term and the batch
    reduction is the weighted mean sum_i w_{y_i} FL_i / sum_i w_{y_i}, so gamma = 0 is exactly the
    weighted CE. p_t is always the plain (unweighted) softmax probability. (LDAM-DRW's released code
    differs: it computes p_t = exp(-w_y CE_i) from the weighted CE and takes the plain mean.)
    """

    head = "linear"

    def __init__(self, gamma):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target, class_weight=None):
        log_pt = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        focal = -(1 - log_pt.exp()).pow(self.gamma) * log_pt
        return weighted_mean(focal, target, class_weight)


class MarginCE(nn.Module):
    """CE_w(s * (z - Delta_y e_y), y) on cosine logits, with a fixed margin Delta_j per class (LDAM, AM)."""

    head = "cosine"

    def __init__(self, margins, s):
        super().__init__()
        self.register_buffer("margins", margins, persistent=False)
        self.s = s

    def forward(self, logits, target, class_weight=None):
        z = shift_target(logits, target, self.margins.to(logits)[target])
        return weighted_ce(self.s * z, target, class_weight)


class MarginHinge(nn.Module):
    """Multi-class hinge l_i = max(0, Delta_{y_i} + max_{j != y_i} z_j - z_{y_i}), (weighted) batch mean."""

    def __init__(self, margins, head):
        super().__init__()
        self.register_buffer("margins", margins, persistent=False)
        self.head = head

    def forward(self, logits, target, class_weight=None):
        z_y = logits.gather(1, target[:, None]).squeeze(1)
        margin = self.margins.to(logits)[target]
        return weighted_mean(F.relu(margin + hardest_negative(logits, target) - z_y), target, class_weight)


class LeastSquares(nn.Module):
    """LS-SVM loss on one-vs-rest targets t_j = +1 (j = y) / -1 (j != y): l_i = 1/2 sum_j (z_ij - t_ij)^2."""

    head = "linear"

    def forward(self, logits, target, class_weight=None):
        t = 2 * F.one_hot(target, logits.shape[1]).to(logits) - 1
        return weighted_mean(0.5 * (logits - t).pow(2).sum(dim=1), target, class_weight)


class PriorCE(nn.Module):
    """CE_w(z + b, y) with a fixed per-class logit offset b (Balanced Softmax: log n; logit adjustment: tau log pi)."""

    head = "linear"

    def __init__(self, offset):
        super().__init__()
        self.register_buffer("offset", offset, persistent=False)

    def forward(self, logits, target, class_weight=None):
        return weighted_ce(logits + self.offset.to(logits), target, class_weight)


class LSoftmax(nn.Module):
    """Large-margin softmax, Liu et al., ICML 2016.

    The target logit |W_y||x| cos(theta) becomes
    f_y = |W_y||x| (lambda cos(theta) + psi(theta)) / (1 + lambda),
    psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m], k = 0..m-1;
    cos(m theta) is the Chebyshev polynomial T_m(cos theta), as in the paper (no arccos).
    Other logits are unchanged; the loss is CE_w of the modified logits.

    needs_norms = True: the loss cannot recover |W_y| and |x| from z = W x, so the trainer passes
    norms=(w_norm[C], x_norm[B]) (bias-free linear head, norms attached to the graph).
    lambda is annealed by set_epoch: lambda_e = max(lambda_min, lambda_start * decay^epoch).
    """

    head = "linear"
    needs_norms = True

    def __init__(self, m, lambda_start, lambda_min, decay):
        super().__init__()
        self.m, self.lambda_start, self.lambda_min, self.decay = m, lambda_start, lambda_min, decay
        self.lam = lambda_start

    def set_epoch(self, epoch, epochs):
        self.lam = max(self.lambda_min, self.lambda_start * self.decay**epoch)

    def forward(self, logits, target, class_weight=None, norms=None):
        if norms is None:
            raise ValueError("lsoftmax needs norms=(w_norm[C], x_norm[B]): the trainer must pass them when loss.needs_norms")
        w_norm, x_norm = norms
        scale = w_norm.to(logits)[target] * x_norm.to(logits)  # |W_y| |x|
        cos = (logits.gather(1, target[:, None]).squeeze(1) / scale).clamp(-1, 1)
        t_prev, t = torch.ones_like(cos), cos  # T_0, T_1; T_{k+1} = 2 c T_k - T_{k-1}
        for _ in range(self.m - 1):
            t_prev, t = t, 2 * cos * t - t_prev
        # k = number of boundaries j pi/m (j = 1..m-1) that theta has passed; psi is continuous there
        k = sum((cos <= math.cos(j * math.pi / self.m)).to(cos) for j in range(1, self.m))
        psi = (1 - 2 * (k % 2)) * t - 2 * k
        f_y = scale * (self.lam * cos + psi) / (1 + self.lam)
        return weighted_ce(logits.scatter(1, target[:, None], f_y[:, None]), target, class_weight)


# -----------------------------------------------------------------------------
# build functions (registered as entry points in the "longtail.losses" group)


def build_ce(class_counts):
    """Cross-entropy (ERM), class-weighted as sum_i w_{y_i} CE_i / sum_i w_{y_i} when weights are given."""
    return CrossEntropy()


def build_focal(class_counts, *, gamma=1.0):
    """Focal loss (Lin et al., ICCV 2017), -(1 - p_t)^gamma log p_t; gamma = 1 as in the CIFAR-LT baselines
    (Cao et al. 2019). With class_weight: alpha_t = w_y and the weighted mean (see Focal)."""
    return Focal(check_number("losses.focal.gamma", gamma, min=0))


def build_ldam(class_counts, *, max_m=0.5, s=30.0):
    """LDAM (Cao et al., NeurIPS 2019): CE_w(s (z - Delta_y e_y), y), Delta_j = K / n_j^(1/4), max Delta = max_m.
    Cosine head; defaults max_m = 0.5, s = 30 from the paper."""
    max_m = check_number("losses.ldam.max_m", max_m, min=0)
    s = check_number("losses.ldam.s", s, above=0)
    return MarginCE(ldam_margins(check_counts("ldam", class_counts), max_m), s)


def build_ldam_hinge(class_counts, *, max_m=0.5):
    """LDAM-HG (Cao et al., NeurIPS 2019): max(max_{j!=y} z_j - z_y + Delta_y, 0) on cosine logits (no scale),
    LDAM margins; class_weight gives the weighted mean sum_i w_{y_i} l_i / sum_i w_{y_i}."""
    max_m = check_number("losses.ldam_hinge.max_m", max_m, min=0)
    return MarginHinge(ldam_margins(check_counts("ldam_hinge", class_counts), max_m), head="cosine")


def build_am(class_counts, *, m=0.35, s=30.0):
    """Additive margin on cosine logits, CE_w(s (z - m e_y), y): AM-Softmax (Wang et al., IEEE SPL 2018) / CosFace,
    the M-DRW baseline of Cao et al. 2019. Defaults m = 0.35, s = 30: AM-Softmax's recommended setting
    (its s = 30 is also LDAM's)."""
    m = check_number("losses.am.m", m, min=0)
    s = check_number("losses.am.s", s, above=0)
    return MarginCE(torch.full((len(class_counts),), m, dtype=torch.float64), s)


def build_hinge(class_counts, *, margin=1.0):
    """Multi-class hinge (Crammer & Singer, JMLR 2001; methods.md cites Suykens & Vandewalle 1999):
    max(0, margin + max_{j!=y} z_j - z_y) on linear logits; class_weight gives the weighted mean."""
    margin = check_number("losses.hinge.margin", margin, min=0)
    return MarginHinge(torch.full((len(class_counts),), margin, dtype=torch.float64), head="linear")


def build_ls_svm(class_counts):
    """LS-SVM loss (Suykens & Vandewalle, Neural Processing Letters 1999; multi-class one-vs-rest, IJCNN 1999):
    the inequality constraints t_j z_j >= 1 - e_j become equalities with squared slack, and since t_j^2 = 1,
    e_j^2 = (z_j - t_j)^2. Per sample 1/2 sum_j (z_j - t_j)^2, t_j = +1 if j = y else -1; (weighted) batch mean.
    The regulariser 1/2 |w|^2 is the optimiser's weight decay, not part of this loss."""
    return LeastSquares()


def build_lsoftmax(class_counts, *, m=4, lambda_start=100.0, lambda_min=0.0, decay=0.95):
    """L-Softmax (Liu et al., ICML 2016), integer m in 2..4 (default 4, the largest margin the paper uses),
    lambda annealed per epoch: max(lambda_min, lambda_start * decay^epoch). Needs norms (see LSoftmax)."""
    if isinstance(m, bool) or m not in (2, 3, 4):
        raise LongtailError(f"losses.lsoftmax.m must be one of 2, 3, 4, got {m!r}")
    lambda_start = check_number("losses.lsoftmax.lambda_start", lambda_start, min=0)
    lambda_min = check_number("losses.lsoftmax.lambda_min", lambda_min, min=0, max=lambda_start)
    decay = check_number("losses.lsoftmax.decay", decay, above=0, max=1)
    return LSoftmax(int(m), lambda_start, lambda_min, decay)


def build_balanced_softmax(class_counts):
    """Balanced Softmax (Ren et al., NeurIPS 2020): CE_w(z + log n, y)."""
    n = torch.tensor(check_counts("balanced_softmax", class_counts), dtype=torch.float64)
    return PriorCE(n.log())


def build_logit_adjust(class_counts, *, tau=1.0):
    """Logit-adjusted loss (Menon et al., ICLR 2021): CE_w(z + tau log pi, y), pi = n / sum n, tau = 1.
    With tau = 1 it equals Balanced Softmax (the offsets differ by a constant)."""
    tau = check_number("losses.logit_adjust.tau", tau, min=0)
    n = torch.tensor(check_counts("logit_adjust", class_counts), dtype=torch.float64)
    return PriorCE(tau * (n / n.sum()).log())
