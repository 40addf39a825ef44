"""Long-tailed class profiles and the LDAM-DRW image selection (docs/methods.md §1). numpy only."""

import numbers

import numpy as np

from pipeline.data import IMBALANCES, SOURCE_PROFILE
from pipeline.errors import LongtailError, n_max_error, unknown


def profile_counts(per_class, *, dataset: str, root: str, imbalance: str, ratio: float, n_max: int | None,
                   classes=None) -> tuple[list[int], int, float]:
    """(counts, n_max, ratio): the training images per class that the params cut from a source with
    `per_class` training images per class (`classes`: their names, for the messages). The one rule that
    build-dataset applies to the decoded source and that `longtail check` applies before it (to the fixed
    counts of cifar / digits, to the listed files of an image folder), so both refuse a profile alike."""
    per_class = [int(n) for n in per_class]
    classes = [str(c) for c in (classes if classes is not None else range(len(per_class)))]
    if len(per_class) < 2:
        raise LongtailError(f"dataset {dataset} (data.root {root}) has {len(per_class)} class "
                            f"({', '.join(classes) or 'none'}): a classification dataset needs at least 2")
    if min(per_class) < 1:
        empty = [c for c, n in zip(classes, per_class) if n == 0]
        raise LongtailError(f"dataset {dataset} (data.root {root}) has no training images in class(es) "
                            f"{', '.join(empty)}: every class needs at least one")
    if imbalance == SOURCE_PROFILE:  # every training image, as the source has them
        return per_class, max(per_class), max(per_class) / min(per_class)
    available = min(per_class)
    n_max = n_max or available
    if n_max > available:
        raise n_max_error(dataset, n_max, available)
    return lt_counts(n_max, len(per_class), imbalance, ratio), n_max, ratio


def lt_counts(n_max: int, num_classes: int, imbalance: str, ratio: float) -> list[int]:
    """Images per class, head first, for imbalance ratio r = n_max / n_min (Cao et al., NeurIPS 2019).

    exp:  n_i = int(n_max * (1/r) ** (i / (C-1))), i = 0..C-1.
    step: the first C//2 classes keep n_max, the other C - C//2 keep int(n_max / r)
          (for odd C the extra class goes to the tail).
    r = 1 gives the balanced profile [n_max] * C.
    """
    if imbalance == SOURCE_PROFILE:
        raise LongtailError("imbalance source has no formula: its counts are the source's own (build-dataset)")
    if imbalance not in IMBALANCES:
        raise unknown("imbalance", imbalance, IMBALANCES)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio >= 1:
        raise LongtailError(f"ratio must be a number >= 1 (n_max / n_min), got {ratio!r}")
    if num_classes < 1 or n_max < 1:
        raise LongtailError(f"need num_classes >= 1 and n_max >= 1, got num_classes={num_classes}, n_max={n_max}")
    if num_classes == 1:
        return [int(n_max)]
    if imbalance == "exp":
        counts = [int(n_max * (1 / ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]
    else:
        head = num_classes // 2
        counts = [int(n_max)] * head + [int(n_max / ratio)] * (num_classes - head)
    if min(counts) < 1:
        raise LongtailError(f"ratio {ratio} leaves a class with no images (n_max = {n_max}); use ratio <= {n_max}")
    return counts


def select_long_tailed(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset, as in the LDAM-DRW code (Cao et al., NeurIPS 2019).

    Seed numpy once, then for each class c in label order shuffle np.where(labels == c)[0] and keep
    the first counts[c]. A private RandomState(seed) gives the same stream as np.random.seed(seed)
    without touching the global state. The chosen images depend only on each class's internal order.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) and (present[0] < 0 or present[-1] >= len(counts)):
        raise LongtailError(f"labels span {present[0]}..{present[-1]} but the profile has {len(counts)} classes")
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n:
            raise LongtailError(f"class {c} has {len(idx)} training images but the profile asks for {n}")
        rng.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
