import os

import numpy as np
import pytest
from PIL import Image

from testkit.cifar import LAYOUT, write_cifar

from pipeline.data import sources
from pipeline.data.sources import load_source
from pipeline.errors import LongtailError


# ------------------------------------------------------------------------------------ digits

def test_digits_split_is_balanced_and_deterministic():
    raw = load_source("digits", "unused")
    assert raw.x_train.shape == (1297, 8, 8, 1) and raw.x_test.shape == (500, 8, 8, 1)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert np.bincount(raw.y_test).tolist() == [50] * 10
    assert raw.x_train.max() == 255 and raw.hflip is False and raw.classes == [str(i) for i in range(10)]
    assert np.bincount(raw.y_train).min() == 124  # class 8: 174 images - 50
    assert len(raw.mean) == len(raw.std) == 1 and 0 < raw.mean[0] < 1
    assert np.allclose(raw.mean[0], (raw.x_train / 255).mean()) and np.allclose(raw.std[0], (raw.x_train / 255).std())
    # the test images are the last 50 of each class in the original order
    from sklearn.datasets import load_digits
    d = load_digits()
    last = np.concatenate([np.where(d.target == c)[0][-50:] for c in range(10)])
    assert np.array_equal(raw.x_test[..., 0], np.rint(d.images[np.sort(last)] * 255 / 16).astype(np.uint8))


def test_unknown_source():
    with pytest.raises(LongtailError, match="unknown dataset 'mnist'.*cifar10"):
        load_source("mnist", ".")


# ------------------------------------------------------------------------------ image folder

def _tree(root, sizes=None, fmt="png", per_class=(3, 2)):
    """root/{train,test}/{cat,ant}/: small images whose first pixel encodes (split, class, index)."""
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(("cat", "ant")):  # sorted order: ant = 0, cat = 1
            os.makedirs(root / split / name)
            for i in range(per_class[s]):
                a = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                a[0, 0] = (s, c, i)
                Image.fromarray(a).save(root / split / name / f"{i:02d}.{fmt}")
    return root


def test_imagefolder_order_and_labels(tmp_path):
    raw = load_source("imagefolder", str(_tree(tmp_path)))
    assert raw.classes == ["ant", "cat"] and raw.hflip is True
    assert raw.x_train.shape == (6, 6, 5, 3) and raw.x_test.shape == (4, 6, 5, 3)
    assert raw.y_train.tolist() == [0, 0, 0, 1, 1, 1] and raw.y_test.tolist() == [0, 0, 1, 1]
    # class index follows sorted folder names ("ant" was written as c=1), files sorted by name
    assert raw.x_train[:, 0, 0].tolist() == [[0, 1, i] for i in range(3)] + [[0, 0, i] for i in range(3)]
    assert raw.x_test[:, 0, 0].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 1]]
    mean, std = raw.mean, raw.std
    assert np.allclose(mean, (raw.x_train / 255).mean((0, 1, 2)))
    assert np.allclose(std, (raw.x_train / 255).std((0, 1, 2)))


def test_imagefolder_jpeg_grayscale_and_parallel_decode(tmp_path, monkeypatch):
    _tree(tmp_path, fmt="jpg")
    Image.new("L", (5, 6), 7).save(tmp_path / "train" / "ant" / "zz.jpeg")  # grayscale -> RGB
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    serial = load_source("imagefolder", str(tmp_path))
    assert serial.x_train.shape == (7, 6, 5, 3) and (serial.x_train[3] == 7).all()
    monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 1)  # exercise the process pool on the tiny tree
    parallel = load_source("imagefolder", str(tmp_path))
    assert np.array_equal(serial.x_train, parallel.x_train) and np.array_equal(serial.x_test, parallel.x_test)


@pytest.mark.parametrize("parallel", [False, True])
def test_imagefolder_corrupt_file(tmp_path, monkeypatch, parallel):
    _tree(tmp_path)
    (tmp_path / "train" / "cat" / "01.png").write_bytes(b"\x89PNG not really")
    if parallel:
        monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 1)
    with pytest.raises(LongtailError, match=r"cannot decode image .*train/cat/01\.png"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_size_mismatch(tmp_path):
    _tree(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "test" / "ant" / "05.png")
    with pytest.raises(LongtailError, match=r"test/ant/05\.png is 9x9 .* 5x6"):
        load_source("imagefolder", str(tmp_path))


def test_image_size_fits_images_of_any_size_and_shape_to_one_square(tmp_path, monkeypatch):
    """A user's own folder holds photos of many sizes: without data.image_size it is refused with a line
    that names the way out; with it, each image's centred square is scaled to image_size x image_size."""
    _tree(tmp_path)
    wide = np.zeros((4, 16, 3), np.uint8)  # 16 wide, 4 high: the centred 4x4 square is columns 6..9
    wide[:, 4:12] = (200, 10, 10)  # red around it too, as far as the bicubic filter reaches
    Image.fromarray(wide).save(tmp_path / "test" / "ant" / "05.png")
    with pytest.raises(LongtailError, match=r"test/ant/05\.png is 16x4 .* or set data.image_size"):
        load_source("imagefolder", str(tmp_path))
    for parallel in (False, True):
        monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 1 if parallel else 10**9)
        raw = load_source("imagefolder", str(tmp_path), image_size=8)
        assert raw.x_train.shape == (6, 8, 8, 3) and raw.x_test.shape == (5, 8, 8, 3)
        # the wide image (test, ant, last) is its red centre only: no black from the sides, no distortion
        assert raw.y_test.tolist() == [0, 0, 0, 1, 1]
        assert np.abs(raw.x_test[2].astype(int) - (200, 10, 10)).max() <= 1


def test_a_photo_stored_sideways_with_a_rotation_tag_is_read_upright(tmp_path):
    """Review: phone photos are often stored landscape with an EXIF orientation tag; they were cropped
    and trained on sideways. Now the tag is applied when the image is read."""
    _tree(tmp_path)
    stored = np.zeros((6, 5, 3), np.uint8)  # as stored: 5 wide, 6 high, the red row on top
    stored[0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    for name in ("00.jpg",):
        Image.fromarray(stored).save(tmp_path / "test" / "ant" / name, quality=100, subsampling=0, exif=exif)
    os.remove(tmp_path / "test" / "ant" / "00.png")
    upright = sources._decode(str(tmp_path / "test" / "ant" / "00.jpg"))
    assert upright.shape == (5, 6, 3)  # displayed: 6 wide, 5 high
    assert upright[:, -1, 0].min() > 200 and upright[:, 0, 0].max() < 60  # the red row is now the right column
    raw = load_source("imagefolder", str(tmp_path), image_size=4)
    assert raw.x_test.shape == (4, 4, 4, 3)


def test_imagefolder_layout_errors(tmp_path):
    _tree(tmp_path)
    os.rename(tmp_path / "test", tmp_path / "val")
    with pytest.raises(LongtailError, match=r"test is not a directory; expected .*train/<class>/<image>"):
        load_source("imagefolder", str(tmp_path))
    os.makedirs(tmp_path / "test" / "ant")
    with pytest.raises(LongtailError, match="test/ant holds no images"):
        load_source("imagefolder", str(tmp_path))
    with pytest.raises(LongtailError, match="not a directory"):
        load_source("imagefolder", str(tmp_path / "nowhere"))


def test_an_image_file_that_cannot_be_read_is_named_not_skipped(tmp_path):
    """Fault injection: a dangling symlink (or a folder, a FIFO) with an image name was skipped silently,
    so the image just disappeared from the dataset."""
    _tree(tmp_path)
    link = tmp_path / "train" / "cat" / "03.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(LongtailError, match=rf"^{link} is a broken link; every image file of {tmp_path} counts"):
        load_source("imagefolder", str(tmp_path))
    link.unlink()
    os.mkfifo(link)
    with pytest.raises(LongtailError, match=rf"^{link} is not a regular file"):
        load_source("imagefolder", str(tmp_path))
    link.unlink()
    link.mkdir()
    with pytest.raises(LongtailError, match=rf"^{link} is a folder"):
        load_source("imagefolder", str(tmp_path))
    link.rmdir()
    link.symlink_to(tmp_path / "train" / "cat" / "00.png")  # a link to an image counts as that image
    assert load_source("imagefolder", str(tmp_path)).x_train.shape[0] == 7


# ------------------------------------------------------------------------------------- CIFAR

def _cifar(root, name, archive, per_batch=20, seed=0):
    """Random images and labels in the original layout, per_batch of each in every member."""
    rng = np.random.default_rng(seed)
    layout = LAYOUT[name]
    return write_cifar(root, name, rng.integers(0, layout.classes, per_batch * len(layout.train)),
                       rng.integers(0, layout.classes, per_batch), images="random", seed=seed, tarball=archive)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_archives(tmp_path, name, archive):
    data = _cifar(tmp_path, name, archive)
    assert data.path == tmp_path / (LAYOUT[name].tarball if archive else LAYOUT[name].folder)
    raw = load_source(name, str(tmp_path))
    n_train = 100 if name == "cifar10" else 20
    assert raw.x_train.shape == (n_train, 32, 32, 3) and raw.x_test.shape == (20, 32, 32, 3)
    assert raw.x_train.dtype == np.uint8 and raw.y_train.dtype == np.int64
    assert np.array_equal(raw.x_train, data.x_train) and raw.y_train.tolist() == data.y_train.tolist()
    assert np.array_equal(raw.x_test, data.x_test) and raw.y_test.tolist() == data.y_test
    assert raw.classes == data.classes and raw.hflip is True
    assert raw.mean == (0.4914, 0.4822, 0.4465) and raw.std == (0.2023, 0.1994, 0.2010)


def test_cifar_missing_member(tmp_path):
    data = _cifar(tmp_path, "cifar10", archive=False)
    (data.path / "data_batch_3").unlink()
    with pytest.raises(LongtailError, match="data_batch_3 is missing"):
        load_source("cifar10", str(tmp_path))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    """A tampered archive: its batch pickle calls os.system when loaded. Nothing runs; one line names it."""
    import pickle

    data = _cifar(tmp_path, "cifar10", archive=False)
    marker = tmp_path / "ran"
    (data.path / "data_batch_2").write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(LongtailError) as err:
        load_source("cifar10", str(tmp_path))
    assert not marker.exists()
    msg = str(err.value)
    assert "data_batch_2" in msg and "system, which a CIFAR batch never holds" in msg and "\n" not in msg, msg


def test_a_python_2_cifar_pickle_still_loads():
    """The official archives were pickled by Python 2 with numpy 1 (numpy.core.multiarray, str as bytes)."""
    blob = (b"\x80\x02}q\x00(U\x06labelsq\x01]q\x02(K\x01K\x02eU\x04dataq\x03cnumpy.core.multiarray\n"
            b"_reconstruct\nq\x04cnumpy\nndarray\nq\x05K\x00\x85U\x01b\x87Rq\x06(K\x01K\x02\x85cnumpy\ndtype\n"
            b"q\x07U\x02u1K\x00K\x01\x87Rq\x08(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x02"
            b"\x07\tq\ttbu.")
    d = sources._unpickle(blob, "test")
    assert d["labels"] == [1, 2] and d["data"].tolist() == [7, 9] and d["data"].dtype == np.uint8


def test_cifar_no_data_no_network(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(LongtailError) as e:
        load_source("cifar10", str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "network is unreachable" in msg
    assert "cifar-10-python.tar.gz" in msg and "dataset=imagefolder" in msg and "data.root=" in msg
    with pytest.raises(LongtailError, match="cifar-100-python.tar.gz"):
        load_source("cifar100", str(tmp_path))


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """Pillow's RGB conversion clipped 16-bit grey at 255 (an almost white image)."""
    _tree(tmp_path)
    img = tmp_path / "train" / "ant" / "00.png"
    w, h = Image.open(img).size
    Image.fromarray(np.full((h, w), 32896, dtype=np.uint16)).save(img)  # mid-grey: 128 * 257
    raw = load_source("imagefolder", str(tmp_path))
    assert (raw.x_train[0] == 128).all()


@pytest.mark.parametrize("array", [np.full((8, 8), 0.5, np.float32), np.full((8, 8), 70000, np.int32)])
def test_32_bit_images_are_rejected_with_a_message(tmp_path, array):
    """32-bit grey (Pillow modes F and I) has no 8-bit reading to scale to; one line names it."""
    path = tmp_path / "x.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(LongtailError) as err:
        sources._decode(str(path))
    assert str(err.value) == f"image {path} has 32-bit pixels (mode {Image.open(path).mode}); save it as 8- or 16-bit"


def _build_refuses(tmp_path, monkeypatch, default_params, source, ratio, message):
    """build_dataset on `source` (in place of the digits) stops with `message` and writes nothing."""
    from pipeline.params import parse
    from pipeline.stages import build_dataset

    p = parse({**default_params, "dataset": "digits", "ratio": ratio})
    monkeypatch.setattr(build_dataset, "load_source", lambda name, root, image_size=None: source)
    with pytest.raises(LongtailError, match=message):
        build_dataset.run(p, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_class_without_images_names_the_dataset(tmp_path, default_params, monkeypatch):
    """A source with an empty class (here: a digits class removed) names dataset and class."""
    raw = sources.load_digits()
    keep = raw.y_train != 3
    empty = sources.RawData(raw.x_train[keep], raw.y_train[keep], raw.x_test, raw.y_test, raw.classes, raw.mean,
                            raw.std, raw.hflip)
    _build_refuses(tmp_path, monkeypatch, default_params, empty, 10,
                   r"dataset digits \(data.root data/raw\) has no training images in class\(es\) 3")


def test_a_one_class_source_is_refused(tmp_path, default_params, monkeypatch):
    """Fault-injection pass: an image folder with one class built a 'long-tailed' dataset whose ratio did nothing."""
    raw = sources.load_digits()
    one = sources.RawData(raw.x_train[raw.y_train == 0], raw.y_train[raw.y_train == 0] * 0, raw.x_test[raw.y_test == 0],
                          raw.y_test[raw.y_test == 0] * 0, ["a"], raw.mean, raw.std, raw.hflip)
    _build_refuses(tmp_path, monkeypatch, default_params, one, 2,
                   r"dataset digits \(data.root data/raw\) has 1 class \(a\): a classification dataset needs at least 2")


def test_the_source_profile_keeps_every_image_of_an_already_long_tailed_folder(tmp_path, default_params):
    """A user's folder that is already long-tailed was cut to the exp profile with n_max = its smallest
    class (here: 3 images per class at most). `imbalance: source` keeps every training image."""
    from pipeline.data.store import load_dataset
    from pipeline.params import parse
    from pipeline.stages import build_dataset

    root = _tree(tmp_path / "lt", per_class=(3, 2))
    for i in range(3, 12):  # cat (class 1) gets 12 training images, ant (class 0) keeps 3
        Image.fromarray(np.full((6, 5, 3), i, np.uint8)).save(root / "train" / "cat" / f"{i:02d}.png")
    base = {**default_params, "dataset": "imagefolder", "data": {"root": str(root), "n_max": "auto"}}

    cut = build_dataset.run(parse({**base, "imbalance": "exp", "ratio": 2}), out_dir=tmp_path / "cut")
    assert cut["class_counts"] == [3, 1] and cut["train_images"] == 4

    kept = build_dataset.run(parse({**base, "imbalance": "source", "ratio": 100}), out_dir=tmp_path / "kept")
    assert kept["class_counts"] == [3, 12] and kept["train_images"] == 15
    assert kept["n_max"] == 12 and kept["ratio"] == 4.0 and kept["imbalance"] == "source"
    ds = load_dataset(tmp_path / "kept" / "dataset.npz")
    assert sorted(ds.y_train.tolist()) == [0] * 3 + [1] * 12 and len(ds.y_test) == 4
    # every training image, each once
    assert len({a.tobytes() for a in ds.x_train}) == 15
    # the ratio param does not apply: another value is the same prepared data, not a stale one
    from pipeline.data.store import check_built_with
    check_built_with(ds, parse({**base, "imbalance": "source", "ratio": 10}), "dataset.npz")
    with pytest.raises(LongtailError, match="was built with imbalance='source', but params.yaml has imbalance='exp'"):
        check_built_with(ds, parse({**base, "imbalance": "exp", "ratio": 10}), "dataset.npz")


def test_check_builds_plugins_with_the_counts_of_the_folder_params_yaml_names(tmp_path, default_params):
    """Review: `longtail check` read the prepared class_counts.json whenever dataset and profile matched,
    so after data.root moved to another image folder it built the plugins (model size, LDAM margins,
    class weights) with the previous folder's classes and counts. Now the prepared counts count only
    when the build's whole data record (data.root included) is what params.yaml says."""
    from pipeline.params import expected_counts, parse
    from pipeline.stages import build_dataset

    first = _tree(tmp_path / "first", per_class=(3, 2))
    other = tmp_path / "other"
    for c in ("a", "b", "c"):
        for split, n in (("train", 2), ("test", 1)):
            os.makedirs(other / split / c)
            for i in range(n):
                Image.fromarray(np.full((6, 5, 3), i, np.uint8)).save(other / split / c / f"{i}.png")
    base = {**default_params, "dataset": "imagefolder", "imbalance": "source", "data": {"n_max": "auto"}}
    built = parse({**base, "data": {**base["data"], "root": str(first)}})
    build_dataset.run(built, out_dir=tmp_path / "prepared")
    prepared = tmp_path / "prepared" / "class_counts.json"

    assert expected_counts(built, prepared) == [3, 3]
    moved = parse({**base, "data": {**base["data"], "root": str(other)}})
    assert expected_counts(moved, prepared) == [2, 2, 2]  # not [3, 3]: that folder's own, listed
    # another profile of the same folder is not the prepared data either: it is cut from the listed files
    assert expected_counts(parse({**base, "imbalance": "exp", "ratio": 2,
                                  "data": {**base["data"], "root": str(first)}}), prepared) == [3, 1]


def test_the_fixed_sources_counts_are_the_sources_own():
    """`longtail check` cuts the digits / CIFAR profiles from SOURCE_COUNTS without reading the source: they
    must be what the source gives (digits here; CIFAR's 5000 / 500 per class are the archives' documented sizes,
    and the synthetic archives of testkit.cifar keep them)."""
    from pipeline.data import SOURCE_COUNTS

    raw = load_source("digits", "")
    assert tuple(np.bincount(raw.y_train).tolist()) == SOURCE_COUNTS["digits"]
    assert SOURCE_COUNTS["cifar10"] == (5000,) * 10 and SOURCE_COUNTS["cifar100"] == (500,) * 100
