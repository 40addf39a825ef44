"""Users get from the official CIFAR archive to an image folder, and no user-facing text names
this project's build machines (../shared)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from testkit import ROOT
from testkit.cifar import balanced_labels, write_cifar

from pipeline.data import sources
from pipeline.data.export import export_images
from pipeline.errors import LongtailError


def test_cifar_archive_anywhere_exports_to_an_identical_image_folder(tmp_path):
    # a CIFAR-10-shaped archive (the official layout, bytes keys as in the Python 2 originals), 6 train / 2 test
    # images per class, outside any data.root
    rng = np.random.default_rng(0)
    archive = write_cifar(tmp_path / "downloads" / "elsewhere", "cifar10", balanced_labels(10, 6, rng),
                          balanced_labels(10, 2, rng), label_names=[f"class {i}" for i in range(10)], bytes_keys=True,
                          tarball=True).path
    assert archive == tmp_path / "downloads" / "elsewhere" / "cifar-10-python.tar.gz"
    raw = sources.load_source("cifar10", str(archive))  # data.root may name the archive itself
    assert raw.x_train.shape == (60, 32, 32, 3) and raw.x_test.shape == (20, 32, 32, 3)
    n = export_images("cifar10", str(archive), tmp_path / "images")
    assert n == {"train": 60, "test": 20, "classes": 10}
    back = sources.load_source("imagefolder", str(tmp_path / "images"))
    assert back.classes == [f"{i}_class_{i}" for i in range(10)]
    for x, y, bx, by in ((raw.x_train, raw.y_train, back.x_train, back.y_train),
                         (raw.x_test, raw.y_test, back.x_test, back.y_test)):
        order = np.argsort(y, kind="stable")  # image folders list by class, then by file name (= source order)
        assert np.array_equal(by, y[order]) and np.array_equal(bx, x[order])
    with pytest.raises(LongtailError, match="not empty"):
        export_images("cifar10", str(archive), tmp_path / "images")


def test_missing_cifar_error_names_only_what_a_user_has(tmp_path, monkeypatch):
    def offline(name, root):
        raise OSError("no network")

    monkeypatch.setattr(sources, "_download_cifar", offline)
    with pytest.raises(LongtailError) as err:
        sources.load_source("cifar10", str(tmp_path))
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "download" in msg and "train/<class>/" in msg
    assert "shared" not in msg and "\n" not in msg


BUILD_MACHINES = re.compile(r"\.\./shared|shared/data|cifar10-jpeg\.tar")  # ../shared/data/cifar10-jpeg.tar.xz
PATH_PART = re.compile(r"""['"]shared['"]""")  # os.path.join("..", "shared", ...) in code
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".json", ".sh"}


def _user_sections(readme: str) -> str:
    """The README without its developer section (the one place that may describe our build machines),
    wherever that section stands."""
    return re.sub(r"^## Development\n.*?(?=^## |\Z)", "", readme, flags=re.M | re.S)


def _user_facing_files(root):
    """Every file whose text a user reads or sees printed: the code (LongtailError messages, typer help
    texts, log lines), the plugin packages, params.yaml, dvc.yaml, the Dockerfile, docs/ and the results
    pages. Tests (and built egg-info copies) are for developers."""
    for top in ("pipeline", "plugins", "docs", "results"):
        for path in sorted((root / top).rglob("*")):
            parts = path.relative_to(root).parts
            if path.is_file() and path.suffix in TEXT and "tests" not in parts \
                    and not any(p.endswith(".egg-info") or p == "__pycache__" for p in parts):
                yield path
    yield from (root / name for name in ("params.yaml", "dvc.yaml", "Dockerfile", "pyproject.toml"))


def test_no_user_facing_text_names_the_build_machines():
    readme = _user_sections((ROOT / "README.md").read_text())
    assert "## Development" not in readme and not BUILD_MACHINES.search(readme)
    files = list(_user_facing_files(ROOT))
    tops = {p.relative_to(ROOT).parts[0] for p in files}
    assert {"pipeline", "plugins", "docs", "results", "params.yaml", "Dockerfile"} <= tops, tops
    for path in files:
        text = path.read_text()
        assert not BUILD_MACHINES.search(text), path
        assert path.suffix != ".py" or not PATH_PART.search(text), path


def test_results_pages_commands_start_from_what_a_user_has():
    """A results page may say how we made its rows, but its commands run on the official archive."""
    pages = sorted((ROOT / "results").rglob("README.md"))
    assert pages
    for page in pages:
        commands = "\n".join(line for line in page.read_text().splitlines() if line.startswith("    "))
        assert "jpeg" not in commands.lower(), page
        if "dataset=imagefolder" in commands:
            assert "longtail export-images" in commands and "cifar-10-python.tar.gz" in commands, page


def test_the_scan_sees_a_build_machine_path_anywhere_a_user_looks(tmp_path):
    """The scan above finds ../shared in each place a user looks, one place at a time."""
    readme = (ROOT / "README.md").read_text()
    assert "../shared" in readme  # in the developer section, which may name it
    assert BUILD_MACHINES.search(_user_sections(readme + "\n## Later\n\nsee ../shared/data\n"))
    for rel in ("pipeline/errors.py", "plugins/longtail-mm/src/longtail_mm/loss.py", "docs/reliability.md",
                "results/cifar10-lt-r100-short/README.md", "dvc.yaml"):
        copy = tmp_path / rel.replace("/", "_")
        (copy / rel).parent.mkdir(parents=True)
        (copy / rel).write_text("raise LongtailError('unpack ../shared/data/cifar10-jpeg.tar.xz')\n")
        hits = [p for p in _user_facing_files(copy) if p.exists() and BUILD_MACHINES.search(p.read_text())]
        assert hits == [copy / rel], rel
    assert PATH_PART.search('os.path.join(ROOT, "..", "shared", "data")')


def _archive(where, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return write_cifar(where, "cifar10", balanced_labels(10, 6, rng), balanced_labels(10, 2, rng),
                       label_names=[f"class {i}" for i in range(10)], tarball=True).path


def test_data_root_naming_a_missing_archive_is_one_line_and_downloads_nothing(tmp_path, monkeypatch):
    # a mistyped archive path: torchvision's download would make a *directory* named cifar-10-python.tar.gz there
    calls = []
    monkeypatch.setattr(sources, "_download_cifar", lambda name, root: calls.append(root))
    missing = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    with pytest.raises(LongtailError) as err:
        sources.load_source("cifar10", str(missing))
    msg = str(err.value)
    assert f"{missing} does not exist" in msg and "data.root" in msg and "cifar-10-python.tar.gz" in msg, msg
    assert calls == [] and not missing.exists()
    # the wrong official archive for the dataset is named as such
    other = write_cifar(tmp_path / "c100", "cifar100", list(range(100)), list(range(100)), tarball=True).path
    with pytest.raises(LongtailError, match="expected the official cifar-10-python.tar.gz"):
        sources.load_source("cifar10", str(other))


def test_export_images_and_build_dataset_from_an_archive_anywhere(tmp_path, default_params, monkeypatch):
    """The user's two ways from the official archive (here a generated one, outside data/raw): the
    `longtail export-images` command, and dataset=cifar10 with data.root=<the archive>; both build the
    same long-tailed training set."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.data.store import load_dataset
    from pipeline.params import parse
    from pipeline.stages import build_dataset

    monkeypatch.setattr(sources, "_download_cifar", lambda name, root: pytest.fail("tried to download"))
    archive = _archive(tmp_path / "somewhere")
    out = tmp_path / "images"
    r = CliRunner().invoke(app, ["export-images", str(out), "--dataset", "cifar10", "--root", str(archive)])
    assert r.exit_code == 0, r.output
    assert "wrote 60 train and 20 test images of 10 classes" in r.output and "dataset=imagefolder" in r.output
    built = {}
    for dataset, root in (("cifar10", archive), ("imagefolder", out)):
        p = parse({**default_params, "dataset": dataset, "ratio": 2, "data": {**default_params["data"], "root": str(root)}})
        build_dataset.run(p, out_dir=tmp_path / dataset)
        built[dataset] = load_dataset(tmp_path / dataset / "dataset.npz")
    a, b = built["cifar10"], built["imagefolder"]
    assert a.class_counts == b.class_counts and a.class_counts[0] == 6 and a.class_counts[-1] == 3
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert np.array_equal(np.sort(a.y_test), np.sort(b.y_test))


def test_export_images_without_the_archive_names_its_own_option(tmp_path, monkeypatch):
    """export-images takes --root: its message must not send the user to data.root or dataset=imagefolder."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setattr(sources, "_download_cifar", lambda name, root: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(LongtailError) as err:
        export_images("cifar10", str(tmp_path / "nothing"), tmp_path / "images")
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and "--root" in msg and "no network" in msg, msg
    assert "data.root" not in msg and "dataset=imagefolder" not in msg and "\n" not in msg, msg
    assert not (tmp_path / "images").exists()


def test_a_failed_download_leaves_no_folder_at_a_mistyped_root(tmp_path, monkeypatch):
    """A mistyped data.root (or `export-images --root /nonexistent`) was handed to torchvision's download, which
    makes the folder before it fails offline: an empty folder was left at the mistyped path. The error is the same
    one line as before, and every folder the failed download made is removed (a download into a new folder,
    online, still works: the default data/raw does not exist in a fresh clone)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    def torchvision_offline(name, root):  # what torchvision's download does without a network
        os.makedirs(root, exist_ok=True)
        raise OSError("no network")

    monkeypatch.setattr(sources, "_download_cifar", torchvision_offline)
    typo = tmp_path / "data" / "rwa"
    with pytest.raises(LongtailError) as err:
        sources.load_source("cifar10", str(typo))
    assert str(err.value).startswith(f"cifar10 not found under {typo} and torchvision's download failed "
                                     f"(OSError: no network); put the official cifar-10-python.tar.gz")
    missing = tmp_path / "nonexistent"
    r = CliRunner().invoke(app, ["export-images", str(tmp_path / "out"), "--dataset", "cifar100",
                                 "--root", str(missing)])
    assert isinstance(r.exception, LongtailError) and "(--root /path/to/cifar-100-python.tar.gz)" in str(r.exception)
    assert os.listdir(tmp_path) == []  # neither root (nor data/ above it), nor the export's target
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(LongtailError):
        sources.load_source("cifar10", str(kept))
    assert kept.is_dir()  # a folder that was there before stays

    def another_job_downloads_meanwhile(name, root):  # a parallel job filled the new folder, then ours failed
        os.makedirs(root, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz.part").write_bytes(b"x")
        raise OSError("no network")

    monkeypatch.setattr(sources, "_download_cifar", another_job_downloads_meanwhile)
    shared = tmp_path / "scratch" / "cifar"
    with pytest.raises(LongtailError):
        sources.load_source("cifar10", str(shared))
    assert (shared / "cifar-10-python.tar.gz.part").exists()  # only empty folders are removed


def test_an_interrupted_export_leaves_no_folder_and_bad_targets_are_one_line(tmp_path, monkeypatch):
    """Fault-injection pass: Ctrl-C during export-images left a half-written tree that the re-run then refused;
    a file as the target gave a NotADirectoryError traceback; an unknown dataset listed imagefolder as valid."""
    from PIL import Image

    from pipeline.data.export import export_images

    saved = []
    real_save = Image.Image.save

    def save_then_interrupt(self, fp, *a, **k):
        saved.append(fp)
        if len(saved) == 20:
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_images("digits", "data/raw", tmp_path / "out")
    assert os.listdir(tmp_path) == []  # neither out nor the partial tree
    monkeypatch.setattr(Image.Image, "save", real_save)
    counts = export_images("digits", "data/raw", tmp_path / "out")  # the re-run works
    assert counts["train"] + counts["test"] == sum(1 for _ in (tmp_path / "out").rglob("*.png"))
    assert sorted(os.listdir(tmp_path)) == ["out"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(LongtailError, match=r"file is a file, not a folder: choose a new folder"):
        export_images("digits", "data/raw", tmp_path / "file")
    with pytest.raises(LongtailError, match=r"unknown dataset 'nope' for export-images \(valid: (?!.*imagefolder)"):
        export_images("nope", "data/raw", tmp_path / "new")


def test_two_exports_into_one_new_folder_keep_one_whole_tree(tmp_path, monkeypatch):
    """Fault injection: two `longtail export-images /tmp/x` at once: the one that finished second died with
    `OSError: [Errno 39] Directory not empty` from the final rename."""
    from PIL import Image

    out = tmp_path / "x"
    real_save = Image.Image.save
    saved = []

    def another_export_finishes_meanwhile(self, fp, *a, **k):
        saved.append(fp)
        if len(saved) == 20:
            monkeypatch.setattr(Image.Image, "save", real_save)
            export_images("digits", "data/raw", out)  # the other process, start to end
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", another_export_finishes_meanwhile)
    with pytest.raises(LongtailError, match=rf"^{out} was written by another export-images meanwhile; "
                                            r"nothing of this run was kept$"):
        export_images("digits", "data/raw", out)
    assert os.listdir(tmp_path) == ["x"]  # no partial tree
    assert sum(1 for _ in out.rglob("*.png")) == 1797  # the other's, whole
