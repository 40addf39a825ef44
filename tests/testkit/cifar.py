"""Synthetic CIFAR-10 / CIFAR-100 in the official python layout (Krizhevsky 2009), the one builder of the tests.

The layout, as https://www.cs.toronto.edu/~kriz/cifar.html ships it: pickled dicts (protocol 2) in a folder
(cifar-10-batches-py/, cifar-100-python/) or in the .tar.gz holding that folder
(cifar-10-python.tar.gz, cifar-100-python.tar.gz).

- cifar10: data_batch_1..5 and test_batch ({"data": uint8 (n, 3072), "labels": [...], ...}),
  batches.meta ({"label_names": [...]})
- cifar100: train and test ({"data", "fine_labels", "coarse_labels", ...}),
  meta ({"fine_label_names": [...], "coarse_label_names": [...]})

Each "data" row is one image as 1024 red, then 1024 green, then 1024 blue values (row-major 32 x 32).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np

class Layout(NamedTuple):
    folder: str
    tarball: str
    train: list[str]  # the train members, in order
    test: str
    meta: str
    label_key: str
    names_key: str
    classes: int


LAYOUT = {
    "cifar10": Layout("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                      "test_batch", "batches.meta", "labels", "label_names", 10),
    "cifar100": Layout("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "meta", "fine_labels",
                       "fine_label_names", 100),
}
COARSE_CLASSES = 20  # CIFAR-100's superclasses


@dataclass
class Cifar:
    """What write_cifar wrote: its path (the folder or the tarball) and the data a loader must give back."""

    path: Path
    classes: list[str]
    batches: dict[str, tuple[np.ndarray, list[int]]]  # member -> (its "data" rows, its labels)
    train: list[str]
    test: str

    @staticmethod
    def _hwc(rows: np.ndarray) -> np.ndarray:
        return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    @property
    def x_train(self) -> np.ndarray:  # (n, 32, 32, 3) uint8, the train members in order
        return np.concatenate([self._hwc(self.batches[m][0]) for m in self.train])

    @property
    def y_train(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.batches[m][1], dtype=np.int64) for m in self.train])

    @property
    def x_test(self) -> np.ndarray:
        return self._hwc(self.batches[self.test][0])

    @property
    def y_test(self) -> list[int]:
        return list(self.batches[self.test][1])


def balanced_labels(classes: int, per_class: int, rng: np.random.Generator) -> list[int]:
    """Every class `per_class` times, in a shuffled order (as the real archives hold them)."""
    return rng.permutation(np.repeat(np.arange(classes), per_class)).tolist()


def write_cifar(root: Path, name: str, train_labels, test_labels, *, images: str = "random", seed: int = 0,
                label_names: list[str] | None = None, bytes_keys: bool = False, tarball: bool = False) -> Cifar:
    """Write `name` ("cifar10" or "cifar100") under root: the folder root/cifar-10-batches-py/ (or
    root/cifar-100-python/), or with tarball=True root/cifar-10-python.tar.gz (or cifar-100-python.tar.gz)
    holding it.

    train_labels are split into equal consecutive parts, one per train member (5 for CIFAR-10, 1 for
    CIFAR-100); test_labels are the test member's. images: "random" (uniform uint8 from `seed`) or "blank"
    (zeros). label_names: the classes' names (default "class 0", "class 1", ...). bytes_keys: the dicts'
    keys as bytes (b"data", b"labels", ...), as the Python 2 originals may read back."""
    folder, tar_name, train, test, meta, label_key, names_key, classes = LAYOUT[name]
    if images not in ("random", "blank"):
        raise ValueError(f"images must be 'random' or 'blank', got {images!r}")
    rng = np.random.default_rng(seed)
    names = list(label_names) if label_names is not None else [f"class {i}" for i in range(classes)]
    assert len(names) == classes, (len(names), classes)
    if len(train_labels) % len(train):
        raise ValueError(f"{len(train_labels)} train labels do not split into {len(train)} equal members")
    parts = np.array_split(np.asarray(train_labels, dtype=np.int64), len(train))
    batches = {}
    for member, labels in [*zip(train, parts), (test, np.asarray(test_labels, dtype=np.int64))]:
        labels = [int(v) for v in labels]
        shape = (len(labels), 3072)
        rows = rng.integers(0, 256, shape, dtype=np.uint8) if images == "random" else np.zeros(shape, np.uint8)
        batches[member] = (rows, labels)

    def key(k: str):
        return k.encode() if bytes_keys else k

    def batch_dict(member: str) -> dict:
        rows, labels = batches[member]
        d = {"batch_label": member, label_key: labels, "data": rows,
             "filenames": [f"{member}_{i:05d}.png" for i in range(len(labels))]}
        if name == "cifar100":
            d["coarse_labels"] = [v * COARSE_CLASSES // classes for v in labels]
        return {key(k): v for k, v in d.items()}

    meta_dict = {names_key: names}
    if name == "cifar100":
        meta_dict["coarse_label_names"] = [f"superclass {i}" for i in range(COARSE_CLASSES)]
    meta_blob = pickle.dumps({key(k): v for k, v in meta_dict.items()}, protocol=2)
    # one member pickled at a time: at the real sizes (blank images, 50000 x 3072) a batch is 30-150 MB
    blobs = ((m, pickle.dumps(batch_dict(m), protocol=2)) for m in batches)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if tarball:
        path = root / tar_name
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
            for member, blob in chain(blobs, [(meta, meta_blob)]):
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size, info.mode = len(blob), 0o644
                tar.addfile(info, io.BytesIO(blob))
    else:
        path = root / folder
        path.mkdir()
        for member, blob in chain(blobs, [(meta, meta_blob)]):
            (path / member).write_bytes(blob)
    return Cifar(path, names, batches, train, test)
