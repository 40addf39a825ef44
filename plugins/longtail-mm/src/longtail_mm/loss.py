"""Maximum-Margin (MM) loss, Kang, Vu & Yoo, ICIP 2021 (formulas: the longtail repo's docs/methods.md §2).

On cosine logits z, for each sample i and WITHOUT gradient (the margin is a constant of the step):
    p = z_y                        positive score
    q = max(0, max_{j != y} z_j)   hardest negative, floored at 0
    d = p - q
    Delta = exp(-d - gamma * M_y)  if d > 0   (hard-positive margin: sample already correct)
            exp( d - M_y)          if d < 0   (hard-negative margin: sample wrong)
            0                      if d == 0
    loss = CE_w(s * (z - Delta e_y), y)  (class-weighted mean with DRW weights)
Variants: "hmm": M_y = max_m; "hmm_ldam": M_y = max_m - 0.5 n_y^(-1/4) / max_j n_j^(-1/4)
(rarer class -> smaller M_y -> larger margin).

as_released=True reproduces the defect in the authors' released loss (HMMLoss.obj_margins): the
positive score of EVERY row is read at the first sample's label y_0, while the hardest negative
stays per row, with the row's own label (its own label column is zeroed and the row max taken):
    p_i = z_{i, y_0},  q_i = max(0, max_{j != y_i} z_{i, j}).
Everything else stays per sample too: M_{y_i} uses the row's own label, the margin is subtracted
from the row's own target logit z_{i, y_i}, and the CE target is y_i. With all labels equal it is
identical to the per-sample loss.
"""

import torch
import torch.nn as nn

from pipeline.plugin_kit import LongtailError, check_counts, check_number, hardest_negative, ldam_margins, shift_target, weighted_ce

VARIANTS = ("hmm", "hmm_ldam")


class MMLoss(nn.Module):
    """The MM loss module: cosine head, per-class M_y in the buffer ``M``."""

    head = "cosine"

    def __init__(self, M, s, gamma, as_released=False):
        super().__init__()
        self.register_buffer("M", M, persistent=False)
        self.s, self.gamma, self.as_released = s, gamma, as_released

    @torch.no_grad()
    def margin(self, logits, target):
        """Delta[B] (no gradient)."""
        at = target[:1].expand_as(target) if self.as_released else target  # the released code reads p at y_0
        p = logits.gather(1, at[:, None]).squeeze(1)
        q = hardest_negative(logits, target).clamp_min(0)
        d = p - q
        M = self.M.to(logits)[target]
        delta = torch.where(d > 0, torch.exp(-d - self.gamma * M), torch.exp(d - M))
        return torch.where(d == 0, torch.zeros_like(delta), delta)

    def forward(self, logits, target, class_weight=None):
        z = shift_target(logits, target, self.margin(logits, target))
        return weighted_ce(self.s * z, target, class_weight)


def build(class_counts, *, variant="hmm", s=19.0, max_m=1.29, gamma=1.528, as_released=False):
    """Build the MM loss (Kang, Vu, Yoo, ICIP 2021).

    Defaults are the authors' tuned CIFAR-100 exp r=100 HMM-DRW setting (s = 19, max_m = 1.29,
    gamma = 1.528); their HMM-LDAM run used s = 26 with the same max_m and gamma (the named methods
    HMM-LDAM and HMM-LDAM-DRW set it).
    """
    if variant not in VARIANTS:
        raise LongtailError(f"losses.mm.variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    s = check_number("losses.mm.s", s, above=0)
    max_m = check_number("losses.mm.max_m", max_m, min=0)
    gamma = check_number("losses.mm.gamma", gamma, min=0)
    if not isinstance(as_released, bool):
        raise LongtailError(f"losses.mm.as_released must be true or false, got {as_released!r}")
    if variant == "hmm":
        M = torch.full((len(class_counts),), max_m, dtype=torch.float64)
    else:
        M = max_m - ldam_margins(check_counts("mm", class_counts), 0.5)
    return MMLoss(M, s, gamma, as_released)
