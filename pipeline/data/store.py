"""The prepared dataset artifact: one uncompressed .npz, written atomically. numpy only."""

import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from pipeline.data import SOURCE_PROFILE
from pipeline.data.sources import RawData
from pipeline.io import atomic_path
from pipeline.errors import LongtailError

KEYS = ("x_train", "y_train", "x_test", "y_test", "classes", "mean", "std", "hflip")


@dataclass
class Prepared(RawData):
    class_counts: list[int]  # training images per class, from y_train
    made_with: dict | None  # the build params that selected it (`built_with`)


def save_dataset(path, x_train, y_train, x_test, y_test, classes, mean, std, hflip, made_with: dict) -> None:
    """Write the dataset to `path` atomically (pipeline.io.atomic_path: temp file, fsync, rename).
    `made_with` (a JSON-able mapping) records the params it was built with, so that a stage can tell a
    stale file from a current one."""
    arrays = dict(
        made_with=np.asarray(json.dumps(made_with, sort_keys=True), dtype=np.str_),
        x_train=np.ascontiguousarray(x_train, dtype=np.uint8), y_train=np.asarray(y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(x_test, dtype=np.uint8), y_test=np.asarray(y_test, dtype=np.int64),
        classes=np.asarray([str(c) for c in classes], dtype=np.str_), mean=np.asarray(mean, dtype=np.float64),
        std=np.asarray(std, dtype=np.float64), hflip=np.asarray(bool(hflip)),
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_dataset(path, require_record: bool = True) -> Prepared:
    """Read and check a dataset written by save_dataset. A stage requires the record of the build params
    (`made_with`); a read-only look at an older run's file (a diagnosis) may go without it."""
    path = os.fspath(path)
    redo = "re-run the build-dataset stage (dvc repro build_dataset)"

    def bad(why):
        return LongtailError(f"prepared dataset {path} {why}; {redo}")

    if not os.path.isfile(path):
        raise bad("does not exist")
    if not zipfile.is_zipfile(path):
        raise bad("is not an .npz archive (empty, truncated or overwritten)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise bad(f"lacks {', '.join(missing)}")
            a = {k: z[k] for k in KEYS}
            made_with = _made_with(z)
    except LongtailError:
        raise
    except Exception as e:  # truncated, not a zip, bad CRC, pickled object arrays, ...
        raise bad(f"is unreadable ({type(e).__name__}: {e})") from None
    if made_with is None and require_record:
        raise bad("does not record the params it was built with (an older longtail wrote it)")

    for split in ("train", "test"):
        x, y = a[f"x_{split}"], a[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (len(x),):
            raise bad(f"has x_{split} {x.dtype}{list(x.shape)}, y_{split} {y.dtype}{list(y.shape)} "
                      f"(expected uint8 [N,H,W,C] and int64 [N])")
    c = a["x_train"].shape[3]
    if a["x_test"].shape[1:] != a["x_train"].shape[1:]:
        raise bad(f"has test images {list(a['x_test'].shape[1:])} but train images {list(a['x_train'].shape[1:])}")
    if a["classes"].dtype.kind != "U" or a["classes"].ndim != 1 or len(a["classes"]) == 0:
        raise bad("has no valid class-name list")
    if a["mean"].shape != (c,) or a["std"].shape != (c,) or a["hflip"].shape != () or a["hflip"].dtype != bool:
        raise bad(f"has mean/std/hflip of the wrong shape (expected {c} channels)")
    k = len(a["classes"])
    for split in ("train", "test"):
        y = a[f"y_{split}"]
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise bad(f"has y_{split} labels outside 0..{k - 1}")
    return Prepared(
        a["x_train"], a["y_train"], a["x_test"], a["y_test"], [str(s) for s in a["classes"]],
        tuple(float(v) for v in a["mean"]), tuple(float(v) for v in a["std"]), bool(a["hflip"]),
        np.bincount(a["y_train"], minlength=k).tolist(), made_with,
    )


def _made_with(z) -> dict | None:
    if "made_with" not in z.files:
        return None
    v = z["made_with"]
    if v.dtype.kind != "U" or v.shape != ():
        return None
    try:
        d = json.loads(str(v))
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def built_with(p) -> dict:
    """The params that decide the prepared data (the build_dataset stage's params in dvc.yaml), as the
    dataset file records them and as a later stage compares them."""
    ratio = None if p.imbalance == SOURCE_PROFILE else float(p.ratio)  # the source profile has no ratio param
    return {"dataset": p.dataset, "data.root": p.data.root, "data.n_max": p.data.n_max, "imbalance": p.imbalance,
            "ratio": ratio, "data.image_size": p.data.image_size}


def _shown(value) -> str:
    return "auto" if value is None else repr(value)  # None is what params.yaml calls auto


def built_record(p) -> dict:
    """`built_with` as a JSON file stores it (class_counts.json, the dataset's record), for comparing."""
    return json.loads(json.dumps(built_with(p)))


def check_built_with(ds: Prepared, p, path) -> None:
    """A stage must train or evaluate on the data params.yaml describes, not on a stale prepared file:
    one line naming the first param that differs and the stage to re-run. data.root is recorded but not
    compared: the same images at another path are the same data (as in the stages' fingerprints)."""
    now = built_record(p)
    for key, value in now.items():
        if key != "data.root" and ds.made_with.get(key) != value:
            raise LongtailError(f"prepared dataset {path} was built with {key}={_shown(ds.made_with.get(key))}, but "
                                f"params.yaml has {key}={_shown(value)}: re-run the build-dataset stage "
                                "(dvc repro build_dataset)")
