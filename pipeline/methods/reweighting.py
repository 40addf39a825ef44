"""Per-class loss weights (docs/methods.md §2). Entry points of group longtail.reweighting; no torch.

Contract: build_<name>(class_counts, **params) -> list[float], one weight per class.
"""

import numbers

from pipeline.checks import check_number
from pipeline.errors import LongtailError


def _counts(class_counts) -> list[int]:
    counts = list(class_counts)
    if not counts or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in counts):
        raise LongtailError(f"class_counts must be positive integers, got {counts}")
    return [int(n) for n in counts]


def build_none(class_counts: list[int]) -> list[float]:
    """No re-weighting: w_j = 1."""
    return [1.0] * len(_counts(class_counts))


def build_inverse(class_counts: list[int], power: float = 1.0) -> list[float]:
    """Inverse class frequency: w_j proportional to n_j^-power (power 1/2: square-root variant), mean 1.
    Computed as (n_min / n_j)^power, which is 1 for the smallest class, so no power underflows them all."""
    power = check_number("reweightings.inverse.power", power, min=0)
    counts = _counts(class_counts)
    n_min = min(counts)
    w = [(n_min / n) ** power for n in counts]
    return [v * len(w) / sum(w) for v in w]


def build_cb(class_counts: list[int], beta: float = 0.9999) -> list[float]:
    """Class-balanced weights of Cui et al. (CVPR 2019), used by DRW (Cao et al., NeurIPS 2019):
    w_j = (1 - beta) / (1 - beta^n_j), the inverse effective number, normalised to sum C."""
    beta = check_number("reweightings.cb.beta", beta, min=0, below=1)
    w = [(1 - beta) / (1 - beta ** n) for n in _counts(class_counts)]
    return [v * len(w) / sum(w) for v in w]
