"""Built-in loss plugins (formulas, sources and recipes: docs/methods.md §2).

Every loss here honours the loss plugin contract written down in pipeline.plugin_kit (build
signature, ``head``, ``forward(logits, target, class_weight=None)``, the optional ``set_epoch`` and
``extra_inputs`` hooks) and uses the shared helpers from there.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import LongtailError
from pipeline.plugin_kit import (check_counts, check_number, hardest_negative, ldam_margins, shift_target,
                                 weighted_ce, weighted_mean)

# -----------------------------------------------------------------------------
# the loss modules (several losses share one module with different constants)


class CrossEntropy(nn.Module):
    """Softmax cross-entropy (ERM); class-weighted mean when class_weight is given."""

    head = "linear"

    def forward(self, logits, target, class_weight=None):
        return weighted_ce(logits, target, class_weight)


class Focal(nn.Module):
    """Focal loss, Lin et al., ICCV 2017: FL_i = -(1 - p_t)^gamma log p_t, p_t = softmax(z)_y.

    With class_weight there are two conventions (``losses.focal.weighting``):
    - "reference" (default), the LDAM-DRW code's (the published CB-Focal figures come from Cui et al.'s
      sigmoid-based focal loss, SigmoidFocal): CE_w,i = w_{y_i} CE_i (no normalisation), p_i = exp(-CE_w,i) and
      loss = mean_i (1 - p_i)^gamma CE_w,i. It is not the weighted mean of the contract: the weight
      also enters the modulating factor.
    - "normalized": alpha_t = w_{y_i} multiplies each sample's focal term and the batch reduction is
      the weighted mean sum_i w_{y_i} FL_i / sum_i w_{y_i}, p_t the plain softmax probability.
    Both give the plain mean of FL_i without class_weight, and gamma = 0 with "normalized" is exactly
    the weighted CE.
    """

    head = "linear"

    def __init__(self, gamma, weighting="reference"):
        super().__init__()
        self.gamma, self.weighting = gamma, weighting

    def forward(self, logits, target, class_weight=None):
        ce = F.cross_entropy(logits, target, reduction="none")
        if self.weighting == "reference" and class_weight is not None:
            ce_w = class_weight.to(ce)[target] * ce
            return ((1 - torch.exp(-ce_w)).pow(self.gamma) * ce_w).mean()
        focal = (1 - torch.exp(-ce)).pow(self.gamma) * ce
        return weighted_mean(focal, target, class_weight)


class SigmoidFocal(nn.Module):
    """Sigmoid-based focal loss with class-balanced weights, as in Cui et al.'s released code (CVPR 2019),
    which produced the published CB-Focal figures. Every class is a binary problem: per sample i and
    class j, t_ij = 1 for j = y_i else 0, BCE_ij = BCE(sigmoid(z_ij), t_ij), q_ij = sigmoid(z_ij) if
    t_ij = 1 else 1 - sigmoid(z_ij), and the loss is sum_ij w_{y_i} (1 - q_ij)^gamma BCE_ij / B: the
    sample's class weight on all its C terms, divided by the batch size (their normalisation by the
    number of positive labels). No class_weight gives w = 1, the plain mean over samples; with weights it
    is not the weighted mean of the contract (a documented exception, like focal's "reference").
    The modulating factor is computed stably as exp(-gamma softplus(s_ij z_ij)), s_ij = +1 / -1 for t = 1 / 0.
    ``init_classifier`` sets the classifier bias to -log(C - 1) (each sigmoid starts at 1/C), as their model does.
    """

    head = "linear"

    def __init__(self, gamma):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target, class_weight=None):
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # bf16 training: fp32 loss
        t = F.one_hot(target, z.shape[1]).to(z)
        bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        per_class = bce if self.gamma == 0 else torch.exp(-self.gamma * F.softplus((2 * t - 1) * z)) * bce
        per_sample = per_class.sum(1)
        if class_weight is not None:
            per_sample = class_weight.to(per_sample)[target] * per_sample
        return per_sample.sum() / len(target)

    def init_classifier(self, classifier: nn.Module) -> None:
        bias = getattr(classifier, "bias", None)
        if bias is not None and classifier.out_features > 1:
            with torch.no_grad():
                bias.fill_(-math.log(classifier.out_features - 1))


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
    cos(theta) = z_y / (|W_y||x| + 1e-9): the epsilon of the authors' layer, so that a feature that
    is exactly zero (a pooled ReLU output) gives cos = 0, not 0/0.
    Other logits are unchanged; the loss is CE_w of the modified logits.

    head "linear_nobias" and extra_inputs ("features", "weight"): the loss cannot recover |W_y| and
    |x| from z = W x, so the trainer also passes the classifier's input features[B, D] and its
    weight[C, D] (attached to the graph).

    lambda is annealed per training step as in the authors' layer:
    lambda_t = max(lambda_min, base (1 + gamma t)^(-power)), t = the number of earlier training steps
    (forward calls with gradients enabled in training mode). t is the buffer ``iteration``, saved in
    the module's state_dict, so a resumed run continues the schedule exactly.
    """

    head = "linear_nobias"
    extra_inputs = ("features", "weight")

    def __init__(self, m, base, gamma, power, lambda_min):
        super().__init__()
        self.m, self.base, self.gamma, self.power, self.lambda_min = m, base, gamma, power, lambda_min
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def lam(self):
        """lambda at the current step."""
        return max(self.lambda_min, self.base * (1 + self.gamma * int(self.iteration)) ** -self.power)

    def forward(self, logits, target, class_weight=None, *, features=None, weight=None):
        if features is None or weight is None:
            raise ValueError("lsoftmax needs features=[B, D] and weight=[C, D] (loss.extra_inputs): the trainer "
                             "passes them")
        lam = self.lam
        if self.training and torch.is_grad_enabled():
            self.iteration += 1
        w_norm, x_norm = weight.norm(dim=1), features.norm(dim=1)
        scale = w_norm.to(logits)[target] * x_norm.to(logits)  # |W_y| |x|
        cos = (logits.gather(1, target[:, None]).squeeze(1) / (scale + 1e-9)).clamp(-1, 1)
        t_prev, t = torch.ones_like(cos), cos  # T_0, T_1; T_{k+1} = 2 c T_k - T_{k-1}
        for _ in range(self.m - 1):
            t_prev, t = t, 2 * cos * t - t_prev
        # k = number of boundaries j pi/m (j = 1..m-1) that theta has passed; psi is continuous there
        k = sum((cos <= math.cos(j * math.pi / self.m)).to(cos) for j in range(1, self.m))
        psi = (1 - 2 * (k % 2)) * t - 2 * k
        f_y = scale * (lam * cos + psi) / (1 + lam)
        return weighted_ce(logits.scatter(1, target[:, None], f_y[:, None]), target, class_weight)


# -----------------------------------------------------------------------------
# build functions (registered as entry points in the "longtail.losses" group)


def build_ce(class_counts):
    """Cross-entropy (ERM), class-weighted as sum_i w_{y_i} CE_i / sum_i w_{y_i} when weights are given."""
    return CrossEntropy()


FOCAL_WEIGHTINGS = ("reference", "normalized")


def build_focal(class_counts, *, gamma=1.0, weighting="reference"):
    """Focal loss (Lin et al., ICCV 2017), -(1 - p_t)^gamma log p_t; gamma = 1 as in the CIFAR-LT baselines
    (Cao et al. 2019). weighting: how class_weight enters, "reference" (the LDAM-DRW code's, default) or
    "normalized" (see Focal)."""
    if weighting not in FOCAL_WEIGHTINGS:
        raise LongtailError(f"losses.focal.weighting must be one of {', '.join(FOCAL_WEIGHTINGS)}, got {weighting!r}")
    return Focal(check_number("losses.focal.gamma", gamma, min=0), weighting)


def build_sigmoid_focal(class_counts, *, gamma=1.0):
    """Class-balanced sigmoid focal loss (Cui et al., CVPR 2019; see SigmoidFocal); gamma = 1, their CIFAR-10 setting."""
    return SigmoidFocal(check_number("losses.sigmoid_focal.gamma", gamma, min=0))


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
    """Multi-class hinge (Crammer & Singer, JMLR 2001; docs/methods.md §2):
    max(0, margin + max_{j!=y} z_j - z_y) on linear logits; class_weight gives the weighted mean."""
    margin = check_number("losses.hinge.margin", margin, min=0)
    return MarginHinge(torch.full((len(class_counts),), margin, dtype=torch.float64), head="linear")


def build_ls_svm(class_counts):
    """LS-SVM loss (Suykens & Vandewalle, Neural Processing Letters 1999; multi-class one-vs-rest, IJCNN 1999):
    the inequality constraints t_j z_j >= 1 - e_j become equalities with squared slack, and since t_j^2 = 1,
    e_j^2 = (z_j - t_j)^2. Per sample 1/2 sum_j (z_j - t_j)^2, t_j = +1 if j = y else -1; (weighted) batch mean.
    The regulariser 1/2 |w|^2 is the optimiser's weight decay, not part of this loss."""
    return LeastSquares()


def build_lsoftmax(class_counts, *, m=4, base=1000.0, gamma=2e-5, power=45.0, lambda_min=5.0):
    """L-Softmax (Liu et al., ICML 2016), integer m in 2..4 (default 4, the largest margin the paper uses).
    lambda per training step t: max(lambda_min, base (1 + gamma t)^(-power)); base, gamma and power are the
    authors' CIFAR setting, lambda_min = 5 their README's advice for harder data (lambda below about 1
    collapsed to one class under the lr-0.1 protocol). Needs features and weight (see LSoftmax)."""
    if isinstance(m, bool) or m not in (2, 3, 4):
        raise LongtailError(f"losses.lsoftmax.m must be one of 2, 3, 4, got {m!r}")
    base = check_number("losses.lsoftmax.base", base, min=0)
    gamma = check_number("losses.lsoftmax.gamma", gamma, min=0)
    power = check_number("losses.lsoftmax.power", power, min=0)
    lambda_min = check_number("losses.lsoftmax.lambda_min", lambda_min, min=0)
    return LSoftmax(int(m), base, gamma, power, lambda_min)


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
