"""Stage 1: a source (cifar10, cifar100, imagefolder, digits) -> the long-tailed train split and the
balanced test split, decoded once into one compact .npz, plus class_counts.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io
from ..data import SOURCE_PROFILE, profile_label
from ..data.profiles import profile_counts, select_long_tailed
from ..data.sources import load_source
from ..data.store import built_with, save_dataset
from ..params import Params

OUT_DIR = Path("data/prepared")


def run(p: Params, out_dir: Path = OUT_DIR, log=None) -> dict:
    raw = load_source(p.dataset, p.data.root, p.data.image_size)
    per_class = np.bincount(raw.y_train, minlength=len(raw.classes))
    counts, n_max, ratio = profile_counts(per_class, dataset=p.dataset, root=p.data.root, imbalance=p.imbalance,
                                          ratio=p.ratio, n_max=p.data.n_max, classes=raw.classes)
    profile = (f"{p.imbalance} (its own counts, r={ratio:.3g})" if p.imbalance == SOURCE_PROFILE
               else profile_label(p.imbalance, p.ratio))
    keep = select_long_tailed(raw.y_train, counts, seed=0)
    save_dataset(out_dir / "dataset.npz", raw.x_train[keep], raw.y_train[keep], raw.x_test, raw.y_test,
                 raw.classes, raw.mean, raw.std, raw.hflip, made_with=built_with(p))
    summary = {"dataset": p.dataset, "imbalance": p.imbalance, "ratio": ratio, "n_max": n_max,
               "train_images": int(sum(counts)), "test_images": int(len(raw.y_test)),
               "image_shape": list(raw.x_train.shape[1:]),
               "classes": list(raw.classes), "class_counts": [int(c) for c in counts], "made_with": built_with(p)}
    io.write_json(out_dir / "class_counts.json", summary)
    if log is not None:
        log.log_metrics({"train_images": summary["train_images"], "test_images": summary["test_images"]})
        log.log_artifact(out_dir / "class_counts.json")
    print(f"build-dataset: {p.dataset} {profile}: {summary['train_images']} train images "
          f"{counts}, {summary['test_images']} test images -> {out_dir / 'dataset.npz'}")
    return summary
