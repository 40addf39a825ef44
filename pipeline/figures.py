"""Matplotlib figures of one run (PNG): training curves, per-class accuracy vs count, confusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def curves(history: list[dict], finetune_start: int, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    ep = [r["epoch"] + 1 for r in history]
    axes[0].plot(ep, [r["train_loss"] for r in history])
    axes[0].set_title("train loss")
    tested = [r for r in history if "test_acc" in r]
    axes[1].plot(ep, [100 * r["train_acc"] for r in history], label="train")
    axes[1].plot([r["epoch"] + 1 for r in tested], [100 * r["test_acc"] for r in tested], label="test")
    axes[1].set_title("accuracy (%)")
    axes[1].legend()
    axes[2].plot(ep, [r["lr"] for r in history])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.axvline(finetune_start + 0.5, color="gray", ls="--", lw=1)
        ax.set_xlabel("epoch")
    _save(fig, path)


def per_class(counts, acc_final, acc_best, classes, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    order = np.argsort(counts)[::-1]
    x = np.arange(len(counts))
    ax.bar(x - 0.2, [100 * (acc_final[i] or 0) for i in order], 0.4, label="final epoch")
    ax.bar(x + 0.2, [100 * (acc_best[i] or 0) for i in order], 0.4, label="best epoch")
    ax.set_ylabel("test accuracy (%)")
    _class_ticks(ax, x, [str(classes[i]) for i in order])
    ax2 = ax.twinx()
    ax2.plot(x, [counts[i] for i in order], "k.-", label="train images")
    ax2.set_yscale("log")
    ax2.set_ylabel("train images (log)")
    ax.legend(loc="upper right")
    ax.set_title("per-class accuracy, classes by training count")
    _save(fig, path)


def confusion(cm, classes, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 14), min(1.6 + 0.5 * n, 13)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=60, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (final epoch, row-normalised colour)")
    _save(fig, path)


def _shot_bounds(ax) -> None:
    """Mark the many (> 100) / medium (20..100) / few (< 20) training-count boundaries on a count axis."""
    for b in (20, 100):
        ax.axvline(b, color="gray", ls=":", lw=1)


def acc_vs_count(counts, acc_final, acc_best, classes, path: Path) -> None:
    """Per-class test accuracy against the class's training count (log x), final and best epoch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    counts = np.asarray(counts, dtype=float)
    for acc, label, marker in ((acc_final, "final epoch", "o"), (acc_best, "best epoch", "x")):
        keep = [i for i, a in enumerate(acc) if a is not None]
        ax.scatter(counts[keep], [100 * acc[i] for i in keep], marker=marker, label=label)
    if len(classes) <= 20:
        for i, a in enumerate(acc_final):
            if a is not None:
                ax.annotate(str(classes[i]), (counts[i], 100 * a), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
    ax.set_xscale("log")
    _shot_bounds(ax)
    ax.set_xlabel("training images of the class (log; dotted: few < 20 <= medium <= 100 < many)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.legend()
    ax.set_title("per-class accuracy vs training count")
    _save(fig, path)


def _count_axis(ax, x, counts) -> None:
    ax2 = ax.twinx()
    ax2.plot(x, counts, ".-", color="gray", alpha=0.7, lw=1, label="train images")
    ax2.set_yscale("log")
    ax2.set_ylabel("train images (log)")


def _class_ticks(ax, x, labels) -> None:
    """Class names under the bars. Up to 12 classes they stay level, and the figure widens when the
    longest name would not fit its slot (CIFAR-10's "airplane" ran into "automobile" at 7 inches)."""
    size = 8 if len(x) <= 40 else 5
    if len(x) <= 12:
        fig, share = ax.figure, ax.get_position().width
        need = max((len(s) for s in labels), default=0) * size * 0.65 / 72 + 0.1  # inches: ~0.65 em a character
        fig.set_figwidth(max(fig.get_figwidth(), need * len(x) / share))
    ax.set_xticks(x, labels, rotation=60 if len(x) > 12 else 0, fontsize=size)


def per_class_compare(counts, series: dict, classes, path: Path, title: str = "") -> None:
    """Per-class test error (%) of several methods, classes sorted by training count (head first),
    with the training count on a second axis. series: label -> (error per class, std per class or None)."""
    plt = _plt()
    order = np.argsort(counts, kind="stable")[::-1]
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(7, 0.12 * len(x) * len(series)), 4))
    width = 0.8 / max(len(series), 1)
    for k, (label, (err, std)) in enumerate(series.items()):
        ys = [np.nan if err[i] is None else err[i] for i in order]
        es = None if std is None else [0 if std[i] is None else std[i] for i in order]
        ax.bar(x - 0.4 + width * (k + 0.5), ys, width, yerr=es, capsize=2 if es is not None else 0, label=label)
    ax.set_ylabel("test error (%)")
    _class_ticks(ax, x, [str(classes[i]) for i in order])
    ax.set_xlabel("class, by training count (gray: train images)")
    _count_axis(ax, x, [counts[i] for i in order])
    ncol = min(len(series), 3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncol=ncol, frameon=False, fontsize=8)
    rows = -(-len(series) // ncol) if series else 1
    ax.set_title(title or "per-class error, classes by training count", pad=10 + 14 * rows)  # above the legend
    _save(fig, path)


def _margin_scale(ax, arrays) -> None:
    """Symmetric-log y when unnormalised logits give margins far beyond the cosine range."""
    big = max([float(np.max(np.abs(a))) for a in arrays if len(a)] + [0.0])
    if big > 20:
        ax.set_yscale("symlog", linthresh=1.0)


def margins(values_by_class, counts, classes, path: Path, unit: str = "logits") -> None:
    """Box plot of per-sample margins z_y - max_{j != y} z_j of each class, classes by training count."""
    plt = _plt()
    order = np.argsort(counts, kind="stable")[::-1]
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(x)), 4))
    data = [np.asarray(values_by_class[i], dtype=float) for i in order]
    ax.boxplot([d if len(d) else [np.nan] for d in data], positions=x, widths=0.6, showfliers=len(x) <= 20,
               flierprops={"markersize": 2})
    ax.axhline(0, color="red", lw=1, ls="--")
    _margin_scale(ax, data)
    ax.set_ylabel(f"margin z_y - max z_j ({unit})")
    _class_ticks(ax, x, [str(classes[i]) for i in order])
    ax.set_xlabel("class, by training count (below the red line: misclassified)")
    _count_axis(ax, x, [counts[i] for i in order])
    ax.set_title("per-class margins on the test set (final model)")
    _save(fig, path)


def margins_compare(counts, series: dict, classes, path: Path, title: str = "") -> None:
    """Median and inter-quartile band of the per-class margins of several runs, classes by training count.
    series: label -> list (per class) of margin arrays."""
    plt = _plt()
    order = np.argsort(counts, kind="stable")[::-1]
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(max(7, 0.12 * len(x)), 4))
    for label, by_class in series.items():
        q = np.array([np.percentile(by_class[i], [25, 50, 75]) if len(by_class[i]) else [np.nan] * 3
                      for i in order])
        line, = ax.plot(x, q[:, 1], "o-", ms=3, label=label)
        ax.fill_between(x, q[:, 0], q[:, 2], color=line.get_color(), alpha=0.15)
    ax.axhline(0, color="red", lw=1, ls="--")
    _margin_scale(ax, [v for by_class in series.values() for v in by_class])
    ax.set_ylabel("margin z_y - max z_j (median, IQR)")
    _class_ticks(ax, x, [str(classes[i]) for i in order])
    ax.set_xlabel("class, by training count (cosine-head losses: margins in cosine units)")
    _count_axis(ax, x, [counts[i] for i in order])
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "per-class test margins")
    _save(fig, path)
