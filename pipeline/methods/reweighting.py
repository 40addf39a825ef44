"""Per-class loss weights (docs/methods.md §2). Entry points of group longtail.reweighting; no torch.

Contract: build_<name>(class_counts, **params) -> list[float], one weight per class.
"""

import numbers

from pipeline.errors import LongtailError


def _counts(class_counts) -> list[int]:
    counts = list(class_counts)
    if not counts or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in counts):
        raise LongtailError(f"class_counts must be positive integers, got {counts}")
    return [int(n) for n in counts]


def _number(value, key: str, valid: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise LongtailError(f"{key} must be {valid}, got {value!r}")
    return float(value)


def build_none(class_counts: list[int]) -> list[float]:
    """No re-weighting: w_j = 1."""
    return [1.0] * len(_counts(class_counts))


def build_inverse(class_counts: list[int], power: float = 1.0) -> list[float]:
    """Inverse class frequency: w_j proportional to n_j^-power (power 1/2: square-root variant), mean 1."""
    power = _number(power, "reweightings.inverse.power", "a number >= 0", lambda p: p >= 0)
    w = [n ** -power for n in _counts(class_counts)]
    return [v * len(w) / sum(w) for v in w]


def build_cb(class_counts: list[int], beta: float = 0.9999) -> list[float]:
    """Class-balanced weights of Cui et al. (CVPR 2019), used by DRW (Cao et al., NeurIPS 2019):
    w_j = (1 - beta) / (1 - beta^n_j), the inverse effective number, normalised to sum C."""
    beta = _number(beta, "reweightings.cb.beta", "in [0, 1)", lambda b: 0 <= b < 1)
    w = [(1 - beta) / (1 - beta ** n) for n in _counts(class_counts)]
    return [v * len(w) / sum(w) for v in w]
