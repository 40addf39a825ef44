"""Per-class evaluation: top-1, per-class accuracy, many/medium/few-shot, confusion matrix.

Shot split as in Liu et al. (OLTR, CVPR 2019) and the CIFAR-LT literature: many > 100 training
images, medium 20..100, few < 20."""

from __future__ import annotations

import numpy as np

MANY, FEW = 100, 20


def shot_groups(class_counts) -> dict[str, list[int]]:
    counts = np.asarray(class_counts)
    return {
        "many": np.flatnonzero(counts > MANY).tolist(),
        "medium": np.flatnonzero((counts >= FEW) & (counts <= MANY)).tolist(),
        "few": np.flatnonzero(counts < FEW).tolist(),
    }


def classification_report(y_true, y_pred, class_counts) -> dict:
    from sklearn.metrics import confusion_matrix

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    num_classes = len(class_counts)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    support = cm.sum(axis=1)
    per_class = np.divide(np.diag(cm), support, out=np.full(num_classes, np.nan), where=support > 0)
    out = {
        "top1": float((y_true == y_pred).mean()),
        "error": float((y_true != y_pred).mean()),
        "per_class": [None if np.isnan(a) else float(a) for a in per_class],
        "confusion": cm.tolist(),
    }
    for group, idx in shot_groups(class_counts).items():
        vals = per_class[idx]
        vals = vals[~np.isnan(vals)]
        out[group] = float(vals.mean()) if len(vals) else None
        out[f"{group}_classes"] = len(idx)
    return out


def sample_margins(logits, y_true) -> np.ndarray:
    """Per-sample margin z_y - max_{j != y} z_j (negative = misclassified), from logits [N, C]."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true)
    rows = np.arange(len(y))
    target = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return target - others.max(axis=1)
