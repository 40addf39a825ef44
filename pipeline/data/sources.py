"""Raw image sources: CIFAR-10/100 python archives, an image-folder tree, scikit-learn digits.

Every source returns a RawData with uint8 HWC images. torchvision is imported only to try a download.
"""

import io
import multiprocessing
import os
import pickle
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline.data import DATASETS
from pipeline.errors import LongtailError, unknown

# Normalisation constants of the LDAM-DRW protocol, used there for both CIFAR-10 and CIFAR-100.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
PARALLEL_DECODE_MIN = 4000  # below this many images a process pool costs more than it saves


@dataclass
class RawData:
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    hflip: bool  # whether a horizontal flip keeps the label


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std over all pixels of uint8 [N,H,W,C] images, in [0, 1] units
    (exact, from each channel's 256-bin histogram)."""
    c = x.shape[-1]
    hist = np.stack([np.bincount(x[..., i].ravel(), minlength=256) for i in range(c)]) / (x.size // c)
    v = np.arange(256) / 255
    mean = hist @ v
    std = np.sqrt(np.maximum(hist @ (v * v) - mean * mean, 0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ---------------------------------------------------------------------------------------------- CIFAR

CIFAR = {  # name -> folder inside the archive, archive name, train files, test file, label key, meta file, names key
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test", "fine_labels", "meta",
                 "fine_label_names"),
}


# What a CIFAR batch pickle may name: numpy arrays (numpy 1 and 2 module paths) and, in protocol-2
# pickles written by Python 3, bytes (_codecs.encode). Anything else (os.system, eval, ...) is refused
# before it is looked up, so a tampered archive cannot run code.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds (refused: "
                                         f"only numpy arrays, lists, numbers and strings are read)")
        return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:  # the originals are Python 2 pickles
        d = _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:
        raise LongtailError(f"cannot read CIFAR batch {where}: {e}") from None
    if not isinstance(d, dict):
        raise LongtailError(f"cannot read CIFAR batch {where}: it holds a {type(d).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_cifar_members(name: str, root: str):
    """({member: bytes}, where) from root/<folder>/ or else root/<archive>.tar.gz; (None, None) if neither."""
    folder, archive, train, test, _, meta, _ = CIFAR[name]
    members = train + [test, meta]
    d = os.path.join(root, folder)
    if os.path.isfile(root):  # data.root names the archive itself, wherever it is
        root, archive = os.path.dirname(root) or ".", os.path.basename(root)
    if os.path.isdir(d):
        out = {}
        for m in members:
            path = os.path.join(d, m)
            if not os.path.isfile(path):
                raise LongtailError(f"{path} is missing: {d} must hold {', '.join(members)}")
            with open(path, "rb") as f:
                out[m] = f.read()
        return out, d
    path = os.path.join(root, archive)
    if os.path.isfile(path):
        try:
            with tarfile.open(path, "r:gz") as tar:
                out = {}
                for m in members:
                    f = tar.extractfile(f"{folder}/{m}")
                    out[m] = f.read()
        except (tarfile.TarError, KeyError, OSError, EOFError, AttributeError) as e:
            raise LongtailError(f"cannot read {path} ({e}); expected the official {CIFAR[name][1]} "
                                f"holding {folder}/{{{','.join(members)}}}") from None
        return out, path
    return None, None


def _first_missing(path: str) -> str | None:
    """The outermost folder of path that does not exist yet (path itself, or one of its parents), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(path: str, top: str) -> None:
    """Remove path and its parents up to top while they are empty (another process's files stay)."""
    path, top = os.path.abspath(path), os.path.abspath(top)
    while True:
        try:
            os.rmdir(path)
        except OSError:  # not empty, or already gone
            return
        if path == top:
            return
        path = os.path.dirname(path)


def _download_cifar(name: str, root: str) -> None:
    import torchvision.datasets  # only here: the data layer never needs torchvision otherwise

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(root, train=True, download=True)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class CifarNotFound(LongtailError):
    """Neither the archive nor its folder under root, and no download (why: the download's error; None when
    root names an archive that does not exist). `option` is the setting that named root: data.root for the
    stages; export-images re-raises with its own (--root)."""

    def __init__(self, name: str, root: str, why: str | None, option: str = "data.root"):
        self.name, self.root, self.why = name, root, why
        super().__init__(self.text(option))

    def text(self, option: str) -> str:
        folder, archive = CIFAR[self.name][:2]
        if option == "data.root":
            elsewhere = (f"or set data.root to the archive wherever it is (-S data.root=/path/to/{archive}), or use "
                         f"dataset=imagefolder with data.root=<your dir holding train/<class>/ and test/<class>/>")
        else:
            elsewhere = f"or give the archive wherever it is ({option} /path/to/{archive})"
        if self.why is None:
            return (f"{self.root} does not exist: {option} names the {self.name} archive; put the official "
                    f"{archive} there, {elsewhere}")
        return (f"{self.name} not found under {os.path.abspath(self.root)} and torchvision's download failed "
                f"({self.why}); put the official {archive} (or its extracted {folder}/) there, {elsewhere}")


def load_cifar(name: str, root: str) -> RawData:
    """CIFAR-10/100 from the original python archives (Krizhevsky 2009), extracted or .tar.gz, under root
    (a folder) or at root (the archive itself)."""
    folder, archive, train, test, label_key, meta, names_key = CIFAR[name]
    blobs, where = _read_cifar_members(name, root)
    if blobs is None:
        if root.endswith(ARCHIVE_SUFFIXES) and not os.path.exists(root):
            # a path to an archive that is not there: torchvision would make a folder of that name
            raise CifarNotFound(name, root, None)
        made = _first_missing(root)  # torchvision makes the folder before it downloads
        try:
            _download_cifar(name, root)
        except Exception as e:
            if made is not None:  # a failed download leaves no empty folder behind at a mistyped root
                _remove_empty(root, made)
            raise CifarNotFound(name, root, f"{type(e).__name__}: {e}") from None
        blobs, where = _read_cifar_members(name, root)
        if blobs is None:
            raise LongtailError(f"{name}: the download finished but {os.path.join(root, folder)} is missing")

    def batch(member):
        d = _unpickle(blobs[member], f"{where}:{member}")
        try:
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            y = np.asarray(d[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise LongtailError(f"{where}:{member} is not a CIFAR batch ({type(e).__name__}: {e})") from None
        if len(x) != len(y):
            raise LongtailError(f"{where}:{member} has {len(x)} images but {len(y)} labels")
        return x, y

    parts = [batch(m) for m in train]
    x_train = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = batch(test)
    classes = [str(c) for c in _unpickle(blobs[meta], f"{where}:{meta}")[names_key]]
    return RawData(x_train, y_train, np.ascontiguousarray(x_test), y_test, classes, CIFAR_MEAN, CIFAR_STD, True)


# ---------------------------------------------------------------------------------------- image folder

def _decode(path: str, size: int | None = None) -> np.ndarray:
    """One image as uint8 RGB [H, W, 3]; with `size`, fitted to size x size (`fit_square`)."""
    try:
        with Image.open(path) as raw:
            im = ImageOps.exif_transpose(raw)  # a photo stored sideways with a rotation tag: upright
            if im.mode.startswith("I;16"):  # 16-bit grayscale: Pillow's RGB conversion clips at 255
                gray = np.rint(np.asarray(im, dtype=np.float64) / 257.0).astype(np.uint8)
                a = np.repeat(gray[..., None], 3, axis=2)
            elif im.mode in ("I", "F"):
                raise LongtailError(f"image {path} has 32-bit pixels (mode {im.mode}); save it as 8- or 16-bit")
            else:
                a = np.asarray(im.convert("RGB"))
            return a if size is None else fit_square(a, size)
    except LongtailError:
        raise
    except Exception as e:
        raise LongtailError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None


def fit_square(a: np.ndarray, size: int) -> np.ndarray:
    """data.image_size: the largest centred square of the image, scaled to size x size (bicubic,
    Pillow's ImageOps.fit), so images of any size and shape become one size without distortion."""
    return np.asarray(ImageOps.fit(Image.fromarray(a), (size, size), method=Image.Resampling.BICUBIC))


def _decode_many(paths: list[str], shape: tuple, size: int | None = None) -> np.ndarray:
    """Decode images that must all have `shape` (H, W, 3) into one uint8 array (with `size`: fitted)."""
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, p in enumerate(paths):
        a = _decode(p, size)
        if a.shape != shape:
            raise LongtailError(f"image {p} is {a.shape[1]}x{a.shape[0]} but the first training image is "
                                f"{shape[1]}x{shape[0]} (width x height); all images must have one size, "
                                "or set data.image_size (e.g. 32) to fit each one to a square of that side")
        out[i] = a
    return out


def _decode_all(paths: list[str], shape: tuple, size: int | None = None) -> np.ndarray:
    """Decode many files in a process pool. PIL's per-image work on small images is GIL-bound, so threads
    are slower than a plain loop; processes scale (60,000 CIFAR JPEGs on 2 cores: 7-8.6 s -> 5.5 s).
    Uses spawn (the caller may hold torch threads), so a calling script needs `if __name__ == "__main__":`."""
    workers = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if len(paths) < PARALLEL_DECODE_MIN or workers < 2:
        return _decode_many(paths, shape, size)
    step = max(256, -(-len(paths) // (4 * workers)))
    chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return np.concatenate(list(ex.map(_decode_many, chunks, [shape] * len(chunks), [size] * len(chunks))))


def _list_split(root: str, split: str) -> tuple[list[str], list[list[str]]]:
    d = os.path.join(root, split)
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>"
    if not os.path.isdir(d):
        raise LongtailError(f"{d} is not a directory; {layout}")
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise LongtailError(f"{d} has no class folders; {layout}")
    files = []
    for c in classes:
        images = [e for e in os.scandir(os.path.join(d, c))
                  if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        for e in images:  # every image file counts, or the build says why it cannot
            if not e.is_file():
                what = ("a broken link" if e.is_symlink() and not os.path.exists(e.path) else
                        "a folder" if e.is_dir() else "not a regular file")
                raise LongtailError(f"{e.path} is {what}; every image file of {root} counts: "
                                    "fix or remove it")
        names = sorted(e.name for e in images)
        if not names:
            raise LongtailError(f"{os.path.join(d, c)} holds no images ({', '.join(IMAGE_EXTENSIONS)}); {layout}")
        files.append([os.path.join(d, c, n) for n in names])
    return classes, files


def list_imagefolder(root: str) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(classes, train files per class, test files per class) of root/{train,test}/<class>/<image>, its layout
    checked; no image is read (so `longtail check` lists a folder's class counts cheaply, as the build counts them)."""
    classes, train_files = _list_split(root, "train")
    test_classes, test_files = _list_split(root, "test")
    if test_classes != classes:
        raise LongtailError(f"{root}/test has class folders {test_classes} but {root}/train has {classes}; "
                            f"they must be the same")
    return classes, train_files, test_files


def load_imagefolder(root: str, image_size: int | None = None) -> RawData:
    """root/{train,test}/<class>/<image>: classes = sorted folder names, images by class then file name.
    image_size None: every image must have the first one's size; else each is fitted to that square."""
    classes, train_files, test_files = list_imagefolder(root)
    shape = _decode(train_files[0][0], image_size).shape

    def split(files):
        paths = [p for ps in files for p in ps]
        y = np.concatenate([np.full(len(ps), c, dtype=np.int64) for c, ps in enumerate(files)])
        return _decode_all(paths, shape, image_size), y

    x_train, y_train = split(train_files)
    x_test, y_test = split(test_files)
    mean, std = channel_stats(x_train)
    return RawData(x_train, y_train, x_test, y_test, classes, mean, std, True)


# ---------------------------------------------------------------------------------------------- digits

def load_digits(root: str = "") -> RawData:
    """scikit-learn's 8x8 digits (UCI optdigits test part, 1,797 images); root is unused.

    Pixels 0..16 -> uint8 round(v * 255 / 16). Split: per class, in original order, the last 50 images
    are test (500, balanced), the rest train. Digits are not flip-invariant, so hflip is False.
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.rint(d.images * 255 / 16).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        test[np.where(y == c)[0][-50:]] = True
    mean, std = channel_stats(x[~test])
    return RawData(x[~test], y[~test], x[test], y[test], [str(c) for c in range(10)], mean, std, False)


SOURCES = {  # one loader per name of pipeline.data.DATASETS
    "cifar10": lambda root: load_cifar("cifar10", root),
    "cifar100": lambda root: load_cifar("cifar100", root),
    "imagefolder": load_imagefolder,
    "digits": load_digits,
}


def load_source(name: str, root: str, image_size: int | None = None) -> RawData:
    """Load one raw source by name (see SOURCES); image_size (data.image_size) is for imagefolder only."""
    if name not in SOURCES:
        raise unknown("dataset", name, SOURCES)
    if image_size is not None:  # params.parse refuses it for the other sources, with the valid values
        if name != "imagefolder":
            raise ValueError(f"image_size is for imagefolder only, not {name}")
        return load_imagefolder(root, image_size)
    return SOURCES[name](root)


assert tuple(SOURCES) == DATASETS, "pipeline.data.DATASETS and SOURCES must list the same datasets"
