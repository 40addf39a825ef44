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
    ax.set_xticks(x, [str(classes[i]) for i in order], rotation=60 if len(x) > 12 else 0, fontsize=8)
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
