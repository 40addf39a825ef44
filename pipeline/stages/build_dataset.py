"""Stage 1: a source (cifar10, cifar100, imagefolder, digits) -> the long-tailed train split and the
balanced test split, decoded once into one compact .npz, plus class_counts.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import io
from ..data import SOURCE_PROFILE, profile_label
from ..data.profiles import lt_counts, select_long_tailed
from ..data.sources import load_source, source_n_max
from ..data.store import built_with, save_dataset
from ..errors import LongtailError, n_max_error
from ..params import Params

OUT_DIR = Path("data/prepared")


def run(p: Params, out_dir: Path = OUT_DIR, log=None) -> dict:
    raw = load_source(p.dataset, p.data.root, p.data.image_size)
    if len(raw.classes) < 2:
        raise LongtailError(f"dataset {p.dataset} (data.root {p.data.root}) has {len(raw.classes)} class "
                            f"({', '.join(map(str, raw.classes)) or 'none'}): a classification dataset needs at least 2")
    available = source_n_max(raw)
    if available < 1:
        per_class = np.bincount(raw.y_train, minlength=len(raw.classes))
        empty = [c for c, n in zip(raw.classes, per_class) if n == 0]
        raise LongtailError(f"dataset {p.dataset} (data.root {p.data.root}) has no training images in class(es) "
                            f"{', '.join(map(str, empty))}: every class needs at least one")
    if p.imbalance == SOURCE_PROFILE:  # every training image, as the source has them
        counts = [int(n) for n in np.bincount(raw.y_train, minlength=len(raw.classes))]
        n_max, ratio = max(counts), max(counts) / min(counts)
        profile = f"{p.imbalance} (its own counts, r={ratio:.3g})"
    else:
        n_max = p.data.n_max or available
        if n_max > available:  # an image folder's size is known only here
            raise n_max_error(p.dataset, n_max, available)
        counts = lt_counts(n_max, len(raw.classes), p.imbalance, p.ratio)
        ratio, profile = p.ratio, profile_label(p.imbalance, p.ratio)
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
