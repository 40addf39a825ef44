"""`longtail export-images`: a raw dataset (the official CIFAR archives, the digits) written as an
image-folder tree, train/<class>/<index>.png and test/<class>/<index>.png, lossless, so that
`dataset=imagefolder` on it reads the same pixels, and the images can be inspected or edited."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LongtailError
from ..io import atomic_folder
from .sources import SOURCES, CifarNotFound, load_source


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def export_images(dataset: str, root: str, out: Path) -> dict:
    """Write `dataset` (read from `root`) under `out`; returns {"train": n, "test": n, "classes": n}.
    File names keep the source order (zero-padded index), class folders sort in class order.
    The tree is written into a hidden sibling folder and renamed to `out` when complete, so an
    interrupted export leaves nothing behind."""
    valid = [k for k in SOURCES if k != "imagefolder"]
    if dataset == "imagefolder":
        raise LongtailError(f"dataset imagefolder is already an image folder (valid: {', '.join(valid)})")
    if dataset not in SOURCES:
        raise LongtailError(f"unknown dataset {dataset!r} for export-images (valid: {', '.join(valid)})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LongtailError(f"{out} is a file, not a folder: choose a new folder for export-images")
    if out.exists() and any(out.iterdir()):
        raise LongtailError(f"{out} exists and is not empty: choose a new folder for export-images")
    from PIL import Image

    try:
        raw = load_source(dataset, root)
    except CifarNotFound as e:
        raise LongtailError(e.text("--root")) from None
    width = len(str(len(raw.classes) - 1))
    folders = [f"{i:0{width}d}_{_safe(c)}" for i, c in enumerate(raw.classes)]  # sorted = class order
    counts = {}
    with atomic_folder(out, by="export-images") as tmp:  # an error, Ctrl-C or SIGTERM leaves no half-written tree
        for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
            digits = len(str(len(y)))
            for f in folders:
                os.makedirs(tmp / split / f, exist_ok=True)
            for i, (img, c) in enumerate(zip(x, y.tolist())):
                arr = img[..., 0] if img.shape[-1] == 1 else img
                Image.fromarray(np.ascontiguousarray(arr)).save(tmp / split / folders[c] / f"{i:0{digits}d}.png")
            counts[split] = int(len(y))
    counts["classes"] = len(raw.classes)
    return counts
