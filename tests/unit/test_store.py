import os
import zipfile

import numpy as np
import pytest

from pipeline.data.store import load_dataset, save_dataset
from pipeline.errors import LongtailError


MADE_WITH = {"dataset": "cifar10", "data.root": "data/raw", "data.n_max": None, "imbalance": "exp", "ratio": 100.0}


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x_train=rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8), y_train=np.array([0] * 6 + [1] * 4 + [2] * 2),
        x_test=rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), y_test=np.array([0, 1, 2] * 2),
        classes=["airplane", "automobile", "bird"], mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        hflip=True, made_with=MADE_WITH,
    )


def test_round_trip(tmp_path):
    a = _arrays()
    path = tmp_path / "sub" / "dataset.npz"  # the folder is created
    save_dataset(path, **a)
    d = load_dataset(path)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(d, k), a[k]) and getattr(d, k).dtype == (np.uint8 if k[0] == "x" else np.int64)
    assert d.classes == a["classes"] and d.mean == a["mean"] and d.std == a["std"] and d.hflip is True
    assert d.class_counts == [6, 4, 2]
    assert os.listdir(tmp_path / "sub") == ["dataset.npz"]


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "dataset.npz"
    save_dataset(path, **_arrays(0))
    save_dataset(path, **_arrays(1))
    assert os.listdir(tmp_path) == ["dataset.npz"]
    assert np.array_equal(load_dataset(path).x_train, _arrays(1)["x_train"])

    def crash(*args, **kwargs):  # the writer dies half-way
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_dataset(path, **_arrays(2))
    assert os.listdir(tmp_path) == ["dataset.npz"]  # old file intact, no temp file left
    assert np.array_equal(load_dataset(path).x_train, _arrays(1)["x_train"])


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a zip":
        path.write_bytes(b"hello, I am a text file\n")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing key":
        a = _arrays()
        del a["hflip"]
        np.savez(path, **a)
    elif how == "wrong dtype":
        a = _arrays()
        a["x_train"] = a["x_train"].astype(np.float32)
        np.savez(path, **a)
    elif how == "wrong shape":
        a = _arrays()
        a["y_train"] = a["y_train"][:5]
        np.savez(path, **{k: np.asarray(v) for k, v in a.items()})
    elif how == "label out of range":
        a = _arrays()
        a["y_test"] = a["y_test"] + 1
        np.savez(path, **{k: np.asarray(v) for k, v in a.items()})
    elif how == "flipped byte":
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("x_train.npy")
        data = bytearray(data)
        data[info.header_offset + 200] ^= 0xFF  # inside the stored array: CRC mismatch
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "not a zip", "empty", "missing key", "wrong dtype", "wrong shape",
                                 "label out of range", "flipped byte"])
def test_corrupt_file(tmp_path, how):
    path = tmp_path / "dataset.npz"
    save_dataset(path, **_arrays())
    _corrupt(path, how)
    with pytest.raises(LongtailError) as e:
        load_dataset(path)
    assert str(path) in str(e.value) and "dvc repro build_dataset" in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(LongtailError, match=r"nope\.npz does not exist; re-run the build-dataset stage"):
        load_dataset(tmp_path / "nope.npz")


# -- checkpoints cannot run code; the atomic writer fsyncs

class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_code_payload_is_refused(tmp_path):
    import torch

    from pipeline.io import load_checkpoint

    marker = tmp_path / "payload-ran"
    payload = _Payload()
    payload.marker = marker
    torch.save({"epoch": 3, "model": {}, "x": payload}, tmp_path / "pretrain.pt")
    with pytest.raises(LongtailError) as err:
        load_checkpoint(tmp_path / "pretrain.pt", "pretrain checkpoint", "pretrain")
    assert "was refused" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()  # nothing executed


def test_a_plain_pickle_with_a_code_payload_is_not_a_torch_file_and_warns_nothing(tmp_path, capfd):
    """Fault injection: a raw pickle (not torch's zip) with a code payload as final.pt ran no code but leaked
    torch's two-line "Detected pickle protocol 4" UserWarning and was called "corrupt or unreadable"."""
    import pickle
    import warnings

    from pipeline.io import load_checkpoint

    payload = _Payload()
    payload.marker = tmp_path / "payload-ran"
    (tmp_path / "final.pt").write_bytes(pickle.dumps({"model": payload}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the load here
        with pytest.raises(LongtailError, match=r"^final checkpoint .*final.pt is not a torch checkpoint file \(not "
                                                r"the zip archive that torch.save writes\): run `dvc repro finetune`"):
            load_checkpoint(tmp_path / "final.pt", "final checkpoint", "finetune")
    assert not payload.marker.exists()
    assert capfd.readouterr().err == ""


def test_a_checkpoint_cut_short_is_corrupt(tmp_path):
    import torch

    from pipeline.io import load_checkpoint

    torch.save({"epoch": 3, "model": {"w": torch.zeros(1000)}}, tmp_path / "pretrain.pt")
    blob = (tmp_path / "pretrain.pt").read_bytes()
    (tmp_path / "pretrain.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LongtailError, match=r"pretrain.pt is corrupt \(a cut short or damaged zip archive: "):
        load_checkpoint(tmp_path / "pretrain.pt", "pretrain checkpoint", "pretrain")


def test_every_torch_load_is_the_safe_one():
    """The only torch.load of the code (pipeline/, the bundled plugins) is
    io.load_checkpoint's, with weights_only=True; every checkpoint goes through it."""
    import ast

    from testkit import ROOT

    calls = []
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("plugins/*/src/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                calls.append((str(path.relative_to(ROOT)), isinstance(safe, ast.Constant) and safe.value is True))
    assert calls == [("pipeline/io.py", True)]


def test_a_torch_file_of_another_structure_is_named(tmp_path):
    import torch

    from pipeline.io import load_checkpoint

    torch.save({"weights": torch.zeros(2)}, tmp_path / "pretrain.pt")
    with pytest.raises(LongtailError, match=r"is not a longtail checkpoint \(no model, epoch\)"):
        load_checkpoint(tmp_path / "pretrain.pt", "pretrain checkpoint", require=("model", "epoch"))


def test_atomic_writer_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from pipeline import io

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    io.write_json(tmp_path / "a.json", {"x": 1})
    assert any(s.startswith(str(tmp_path / ".a.json.")) for s in synced)  # the file, before the rename
    assert str(tmp_path) in synced  # the folder, after it
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) != "0o600"


def test_the_sweep_record_and_a_rewritten_params_yaml_are_written_atomically(tmp_path, monkeypatch):
    """The SLURM sweep record (what a re-submission reads) and the user's params.yaml, which
    `longtail plugins add/new` rewrite, go through the one atomic writer too (fsync, rename, fsync)."""
    from pipeline import scaffold, slurm

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    sweep = slurm.Sweep("s1", str(tmp_path), "0" * 40, [{"name": "s1-0", "args": [], "jobs": []}])
    sweep.save()
    assert slurm.Sweep.load(sweep.dir / "sweep.json") == sweep
    params = tmp_path / "params.yaml"
    params.write_text("losses:\n  ce: {}\n")
    assert scaffold.add_section(params, "losses", "mine", {"smoothing": 0.0})
    assert params.read_text() == "losses:\n  mine: {smoothing: 0.0}\n  ce: {}\n"
    for folder, name in ((sweep.dir, "sweep.json"), (tmp_path, "params.yaml")):
        assert any(s.startswith(str(folder / f".{name}.")) for s in synced), (name, synced)  # the file
        assert str(folder) in synced  # and its folder, after the rename
    assert sorted(p.name for p in sweep.dir.iterdir()) == ["sweep.json"]  # no temp file left


def test_the_build_params_are_recorded_and_a_file_without_them_is_refused(tmp_path):
    path = tmp_path / "dataset.npz"
    save_dataset(path, **_arrays())
    assert load_dataset(path).made_with == MADE_WITH
    a = _arrays()
    a.pop("made_with")
    arrays = dict(x_train=a["x_train"], y_train=a["y_train"].astype(np.int64), x_test=a["x_test"],
                  y_test=a["y_test"].astype(np.int64), classes=np.asarray(a["classes"]), mean=np.asarray(a["mean"]),
                  std=np.asarray(a["std"]), hflip=np.asarray(True))
    np.savez(path, **arrays)  # as an older longtail wrote it
    with pytest.raises(LongtailError, match=r"does not record the params it was built with .*dvc repro build_dataset"):
        load_dataset(path)
    # a read-only diagnosis of an older run's file (results/.../diagnosis/fit.py) may read it as it is
    old = load_dataset(path, require_record=False)
    assert old.made_with is None and old.y_train.tolist() == arrays["y_train"].tolist()


def test_a_dataset_built_at_another_image_size_is_refused_and_an_older_record_counts_as_auto(tmp_path, default_params):
    """data.image_size is part of the build record: a stage refuses data fitted to another size, in the
    words params.yaml uses (auto, not None); a dataset.npz recorded before the key existed was built
    with the images as they are, which is auto."""
    from pipeline.data.store import built_with, check_built_with
    from pipeline.params import override, parse

    folder = {"dataset": "imagefolder", "imbalance": "source"}
    auto, fitted = parse(override(default_params, folder)), parse(override(default_params, {**folder, "data.image_size": 32}))
    path = tmp_path / "dataset.npz"
    save_dataset(path, **{**_arrays(), "made_with": built_with(auto)})
    with pytest.raises(LongtailError) as err:
        check_built_with(load_dataset(path), fitted, path)
    assert "was built with data.image_size=auto, but params.yaml has data.image_size=32: re-run" in str(err.value)
    older = {k: v for k, v in built_with(auto).items() if k != "data.image_size"}
    save_dataset(path, **{**_arrays(), "made_with": older})
    check_built_with(load_dataset(path), auto, path)  # accepted
    with pytest.raises(LongtailError, match="built with data.image_size=auto, but params.yaml has data.image_size=32"):
        check_built_with(load_dataset(path), fitted, path)


def test_a_model_with_extra_state_fits_its_checkpoint():
    """A model plugin whose module keeps `get_extra_state` (saved as '<prefix>_extra_state', any object
    torch.load reads) must load: the structure check asked every state-dict value to be a tensor."""
    import torch

    from pipeline.stages.training import _weights, misfit

    class Versioned(torch.nn.Linear):
        def get_extra_state(self):
            return {"version": 2}

        def set_extra_state(self, state):
            self.version = state["version"]

    model = torch.nn.Sequential(Versioned(3, 2))
    weights = model.state_dict()
    assert "0._extra_state" in weights
    assert _weights(weights) is None and misfit(model, weights) is None
    assert "holds" in _weights({**weights, "0.weight": {"not": "a tensor"}})
    assert misfit(model, {**weights, "0.weight": torch.zeros(5, 3)}).startswith("size mismatch for 0.weight")
