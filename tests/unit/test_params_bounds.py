"""Fault-injection pass on params values: seeds, sizes, powers and key types that the check passed and a
stage (or the check itself) then crashed on with a traceback. Each is now one line naming the key."""

import pytest
import yaml

from testkit import tiny_pretrain_finetune

from pipeline.checks import SEED_MAX
from pipeline.errors import LongtailError
from pipeline.methods import reweighting
from pipeline.params import SECTION_KEYS, TOP_KEYS, check_plugins, load, override, parse

YAML_KEYS = "YAML reads null, ~ and an empty key as null and true / false as booleans: quote a key to keep it text"
C10_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture
def tiny(default_params) -> dict:
    """The tiny digits settings of the training tests."""
    return tiny_pretrain_finetune(default_params)


def _refused(raw: dict, counts=None) -> str:
    with pytest.raises(LongtailError) as err:
        check_plugins(parse(raw), class_counts=counts)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("overrides, message", [
    # the trainer seeds torch generators with seed + 1: 2**64 - 1 passed and then overflowed there
    ({"seed": 2**64 - 1}, "seed must be <= 4294967295, got 18446744073709551615"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"finetunes.tau_norm.holdout_seed": 2**64}, "finetunes.tau_norm.holdout_seed must be <= 4294967295, "
                                                 "got 18446744073709551616"),
    ({"finetunes.crt.init_seed": 2**64}, "finetunes.crt.init_seed must be <= 4294967295, got 18446744073709551616"),
    ({"finetunes.crt.init_seed": -1}, "finetunes.crt.init_seed must be >= 0, got -1"),
])
def test_a_seed_out_of_the_range_every_generator_takes_is_refused(tiny, overrides, message):
    assert _refused(override(tiny, overrides)) == message


def test_the_largest_seed_is_taken_by_every_generator_that_a_seed_feeds(tiny):
    """SEED_MAX is accepted by the check and by what seeds feed: torch generators as seed, seed + 1 and
    the reference loader's seed * 100003 + epoch, the classifier stage's generators, numpy's RandomState."""
    import numpy as np
    import torch

    from pipeline.methods.classifier_stage import balanced_subset, reinit_classifier

    check_plugins(parse(override(tiny, {"seed": SEED_MAX, "finetunes.crt.init_seed": SEED_MAX,
                                        "finetunes.tau_norm.holdout_seed": SEED_MAX})))
    for seed in (SEED_MAX, SEED_MAX + 1, SEED_MAX * 100003 + 10**6):
        torch.Generator().manual_seed(seed)
    np.random.RandomState(SEED_MAX)
    reinit_classifier(torch.nn.Linear(4, 2), SEED_MAX)
    assert len(balanced_subset(torch.tensor([0, 1, 1]), 1, SEED_MAX)) == 2


def test_a_large_inverse_power_does_not_divide_by_zero(default_params):
    """Every n ** -200 underflowed to 0 and the mean-1 normalisation divided by zero in `longtail check`."""
    w = reweighting.build_inverse(C10_R100, power=200)
    assert w[-1] == pytest.approx(len(w)) and sum(w) == pytest.approx(len(w))
    assert reweighting.build_inverse([1, 4]) == pytest.approx([1.6, 0.4])  # as before for a usual power
    check_plugins(parse(override(default_params, {"reweightings.inverse.power": 200})), class_counts=C10_R100)


def _write(path, raw: dict, extra: str = "") -> None:
    path.write_bytes(yaml.safe_dump(raw).encode() + extra.encode("latin-1"))


@pytest.mark.parametrize("extra, message", [
    ("\ntrue: 1\n", f"unknown key True in params.yaml (valid: {', '.join(sorted(TOP_KEYS))}; {YAML_KEYS})"),
    ("\non: 1\n", "unknown key on in params.yaml (valid: " + ", ".join(sorted(TOP_KEYS)) + ")"),  # YAML 1.2, as DVC
    ("\nnull: 1\n", f"unknown key None in params.yaml (valid: {', '.join(sorted(TOP_KEYS))}; {YAML_KEYS})"),
    ("\n1: x\n", f"unknown key 1 in params.yaml (valid: {', '.join(sorted(TOP_KEYS))})"),
    ("\ntracking:\n  False: 1\n", f"unknown key tracking.False in params.yaml (valid: experiment; {YAML_KEYS})"),
    ("\nlosses:\n  ce: {5: .nan}\n", "losses.ce.5 must be a finite number, got nan"),  # was a KeyError
])
def test_a_key_that_yaml_reads_as_no_string_is_named(tmp_path, monkeypatch, tiny, extra, message):
    """A key YAML reads as no string (true, null, 1) gave difflib's TypeError."""
    tiny.pop("tracking"), tiny.pop("losses")
    _write(tmp_path / "params.yaml", tiny, extra)
    monkeypatch.chdir(tmp_path)  # the file as the stages name it (a message names the file as given)
    with pytest.raises(LongtailError) as err:
        load("params.yaml")
    assert str(err.value) == message


def test_a_number_key_in_a_section_is_named(tiny):
    raw = override(tiny, {})
    raw["train"][5] = 6
    with pytest.raises(LongtailError) as err:
        parse(raw)
    assert str(err.value) == f"unknown key train.5 in params.yaml (valid: {', '.join(sorted(SECTION_KEYS['train']))})"


def test_a_params_file_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path, tiny):
    """`path.read_text()` raised UnicodeDecodeError / IsADirectoryError."""
    path = tmp_path / "params.yaml"
    _write(path, tiny, "# r\xe9glages\n")
    line = path.read_bytes().count(b"\n")
    with pytest.raises(LongtailError) as err:
        load(path)
    assert str(err.value) == f"params file {path} is not UTF-8 text (line {line}: byte 0xe9); save it as UTF-8"
    with pytest.raises(LongtailError) as err:
        load(tmp_path)
    assert str(err.value) == f"params file {tmp_path} is a directory, not a YAML file"


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "imagefolder", "data.n_max": "auto", "data.image_size": 2**31},
     "data.image_size must be <= 1024, got 2147483648 (or auto)"),
    ({"train.pad": 100000}, "train.pad (100000) must be below the image side, 8 px for digits (valid: 0..7 or auto)"),
    ({"dataset": "cifar10", "train.pad": 32}, "train.pad (32) must be below the image side, 32 px for cifar10 "
                                              "(valid: 0..31 or auto)"),
    ({"dataset": "imagefolder", "data.image_size": 64, "train.pad": 64},
     "train.pad (64) must be below the image side, 64 px by data.image_size (valid: 0..63 or auto)"),
    ({"dataset": "imagefolder", "train.pad": 5000},
     "train.pad (5000) must be below 1024 px, the largest image side data.image_size fits (valid: 0..1023 or auto)"),
    # the check said ok; build-dataset refused it (or a sweep queued it)
    ({"dataset": "cifar10", "data.n_max": 6000},
     "data.n_max (6000) is more than the 5000 images per class that cifar10 has (valid: 1..5000 or auto)"),
    ({"dataset": "cifar100", "data.n_max": 501},
     "data.n_max (501) is more than the 500 images per class that cifar100 has (valid: 1..500 or auto)"),
    # math.isfinite(int) overflowed
    ({"train.epochs": 10**400}, "train.epochs must be an integer of at most 308 digits, got a 401-digit integer"),
    ({"train.lr": -10**400}, "train.lr must be a number of at most 308 digits, got a 401-digit integer"),
    ({"losses.focal.gamma": 10**400}, "losses.focal.gamma must be a number of at most 308 digits, "
                                      "got a 401-digit integer"),
    # a non-string fine-tune sampler passed the check and failed after stage 1 as "unknown train.sampler None"
    ({"finetune.strategy": "crt", "finetune.start_epoch": 4, "finetunes.crt.sampler": None},
     "finetunes.crt.sampler must be a plugin name, got None"),
    ({"finetune.strategy": "crt", "finetune.start_epoch": 4, "finetunes.crt.sampler": 5},
     "finetunes.crt.sampler must be a plugin name, got 5"),
    ({"finetunes.lws.sampler": None}, "finetunes.lws.sampler must be a plugin name, got None"),
])
def test_values_that_crashed_a_stage_are_refused_by_the_check(tiny, overrides, message):
    assert _refused(override(tiny, overrides), counts=[50, 5]) == message


def test_a_side_at_the_limit_and_a_pad_below_the_side_are_taken(tiny):
    p = parse(override(tiny, {"dataset": "imagefolder", "data.image_size": 1024, "train.pad": 1023}))
    assert (p.data.image_size, p.train.pad) == (1024, 1023)
    assert parse(override(tiny, {"dataset": "cifar10", "data.n_max": 5000, "train.pad": 31})).data.n_max == 5000


def test_an_image_that_cannot_be_fitted_is_one_line(tmp_path):
    """fit_square ran outside the decode errors' `try`: an OverflowError traceback."""
    import numpy as np
    from PIL import Image

    from pipeline.data.sources import _decode

    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(LongtailError) as err:
        _decode(str(tmp_path / "a.png"), 2**31)
    assert str(err.value).startswith(f"cannot decode image {tmp_path / 'a.png'} (OverflowError: ")


def test_a_missing_section_suggests_no_other_valid_key(tiny):
    """`tracking` is close to `train` but is a section of its own: it is no misspelling of train."""
    del tiny["train"]
    with pytest.raises(LongtailError) as err:
        parse(tiny)
    assert str(err.value) == "missing key train in params.yaml"


@pytest.mark.parametrize("edit, message", [
    (lambda path, raw: _write(path, raw, "\ntrue: 1\n"), "error: unknown key True in params.yaml (valid: "),
    (lambda path, raw: _write(path, raw, "# r\xe9glages\n"), "error: params file params.yaml is not UTF-8 text (line "),
    (lambda path, raw: _write(path, override(raw, {"seed": 2**64 - 1})),
     "error: seed must be <= 4294967295, got 18446744073709551615"),
    (lambda path, raw: _write(path, override(raw, {"finetune.strategy": "crt", "finetune.start_epoch": 4,
                                                   "finetunes.crt.sampler": None})),
     "error: finetunes.crt.sampler must be a plugin name, got None"),
])
def test_longtail_check_says_each_in_one_line(tmp_path, tiny, monkeypatch, capsys, edit, message):
    import sys

    from pipeline import cli

    tiny.pop("tracking")
    edit(tmp_path / "params.yaml", tiny)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["longtail", "check"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(message), err


@pytest.mark.parametrize("text, value", [
    ("1:30:00", "1:30:00"),  # YAML 1.1: 5400 (base 60), so slurm.time would have been 5400 minutes
    ("010", 10), ("0o10", 8), ("0x1f", 31), ("-3", -3), ("1_000", 1000),
    ("on", "on"), ("yes", "yes"), ("no", "no"), ("off", "off"),  # YAML 1.1: booleans
    ("true", True), ("False", False), ("1e-3", 1e-3), ("~", None),
])
def test_params_values_are_read_as_dvc_reads_them(text, value):
    """DVC reads params.yaml as YAML 1.2 (ruamel); the stages read it the same way, so a value means one thing."""
    from pipeline.checks import yaml_load

    got = yaml_load(f"a: {text}\n")["a"]
    assert got == value and type(got) is type(value)


def test_an_unquoted_slurm_time_is_the_time_it_says():
    from pipeline.checks import yaml_load
    from pipeline.slurm import parse_time

    assert parse_time(yaml_load("time: 1:30:00\n")["time"]) == 90


@pytest.mark.parametrize("text, value", [
    ("-0x10", -16), ("+0o7", 7), ("0b101", 5),  # YAML 1.2 (ruamel) reads these as numbers too
])
def test_signed_and_binary_integers_are_numbers(text, value):
    from pipeline.checks import yaml_load

    assert yaml_load(f"a: {text}\n")["a"] == value


@pytest.mark.parametrize("text, value", [("0128", "0128"), ("08", "08"), ("0x10", "0x10"), ("12", 12),
                                         ("-5", -5), ("1_000", 1000), ("1e-3", 1e-3)])
def test_a_set_value_is_read_with_hydras_integers(text, value):
    """DVC parses -S with Hydra's grammar, whose integers are plain decimals: -S train.batch_size=0128 is written
    as the text '0128', so the sweep must not check it as the number 128."""
    from pipeline.checks import yaml_value

    got = yaml_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["a: 0x_\n", "a: 0o_\n", "seed: " + "9" * 5000 + "\n"])
def test_an_integer_python_cannot_read_is_a_yaml_error_in_one_line(text):
    from pipeline.checks import yaml_text

    with pytest.raises(LongtailError, match=r"^params file p is not valid YAML \(line 1: cannot read the integer "):
        yaml_text(text, "params file p")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, tiny):
    """A "billion laughs" params file (8 levels of 9 aliases each: 43 million values) took `longtail check`
    about 35 s (one level more: minutes): PyYAML builds the aliases as shared lists, and each walk over
    the params then visits every path. The reader now counts the expanded values and refuses such a file."""
    import time

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(tiny) + "\n".join(levels) + "\n")
    start = time.monotonic()
    with pytest.raises(LongtailError) as err:
        load(path)
    assert time.monotonic() - start < 1
    line = len(yaml.safe_dump(tiny).splitlines()) + 6  # a5: 9**6 values, the first level over the limit
    assert str(err.value) == (f"params file {path} is not valid YAML (line {line}: its aliases (*name) expand to more "
                              "than 100,000 values; write the values out or use fewer nested aliases)")
    # aliases that expand to a sane size are read as before
    path.write_text(yaml.safe_dump(tiny) + "\n".join(levels[:4]) + "\n")
    with pytest.raises(LongtailError, match="^unknown key a0 in "):
        load(path)


# -- the plugins' own value checks and the data params' limits, before build-dataset has run (rows 70-72) --------

@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A project folder as a fresh clone has it: no data/prepared."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stale_prepared(folder, record: dict) -> None:
    """data/prepared/class_counts.json of an earlier build (another dataset)."""
    import json

    (folder / "data" / "prepared").mkdir(parents=True)
    (folder / "data" / "prepared" / "class_counts.json").write_text(json.dumps(
        {"class_counts": [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], "made_with": record}))


@pytest.mark.parametrize("loss, key, value, message", [
    ("focal", "gamma", -1.0, "losses.focal.gamma must be >= 0, got -1"),
    ("focal", "weighting", "Reference", "losses.focal.weighting must be one of reference, normalized, got 'Reference'"),
    ("am", "s", 0, "losses.am.s must be > 0, got 0"),
    ("mm", "s", -19, "losses.mm.s must be > 0, got -19"),
    ("mm", "as_released", "no", "losses.mm.as_released must be true or false, got 'no'"),
    ("lsoftmax", "m", 0, "losses.lsoftmax.m must be one of 2, 3, 4, got 0"),
    ("hinge", "margin", -1, "losses.hinge.margin must be >= 0, got -1"),
])
def test_a_plugin_value_is_checked_on_digits_before_the_dataset_is_built(fresh, tiny, loss, key, value, message):
    """With no prepared dataset (a fresh clone) the digits counts were unknown, so `longtail check`, `sweep`
    and `demo` only matched keys against the build signature and never built the plugin: the check said ok
    and every queued experiment failed at pretrain. The digits profile follows from the params (fixed
    images per class), so the plugin is built and its own check runs, whatever data/prepared holds."""
    from pipeline import sweep

    raw = override(tiny, {"loss": loss, f"losses.{loss}.{key}": value})
    assert _refused(raw) == message
    _stale_prepared(fresh, {"dataset": "cifar10", "data.root": "data/raw", "data.n_max": None, "imbalance": "exp",
                            "ratio": 100.0, "data.image_size": None})
    assert _refused(raw) == message
    with pytest.raises(LongtailError) as err:  # `longtail sweep --dry-run --loss L -S KEY=VALUE` and the demo
        sweep.build_grid(tiny, losses=[loss], extra=sweep.parse_set([f"losses.{loss}.{key}={value}"]))
    assert str(err.value).endswith(message)


def _build_refusal(raw: dict, out) -> str:
    """What build-dataset says of these params."""
    from pipeline.stages import build_dataset

    with pytest.raises(LongtailError) as err:
        build_dataset.run(parse(raw), out_dir=out)
    return str(err.value)


def _folder(root, per_class=(4, 1)):
    """root/{train,test}/<class>/: tiny PNGs, `per_class` training images per class."""
    import numpy as np
    from PIL import Image

    for c, n in zip("ab", per_class):
        for split, k in (("train", n), ("test", 1)):
            (root / split / c).mkdir(parents=True)
            for i in range(k):
                Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("dataset, overrides, message", [
    ("digits", {"ratio": 500}, "ratio 500.0 leaves a class with no images (n_max = 40); use ratio <= 40"),
    ("digits", {"data.n_max": 10000},
     "data.n_max (10000) is more than the 124 images per class that digits has (valid: 1..124 or auto)"),
    ("cifar10", {"ratio": 6000, "data.n_max": "auto"},
     "ratio 6000.0 leaves a class with no images (n_max = 5000); use ratio <= 5000"),
    ("imagefolder", {"data.n_max": 5}, "data.n_max (5) is more than the 1 images per class that imagefolder has "
                                       "(valid: 1..1 or auto)"),
    ("imagefolder", {"data.n_max": "auto", "ratio": 2}, "ratio 2.0 leaves a class with no images (n_max = 1); "
                                                        "use ratio <= 1"),
    ("imagefolder", {"data.root": "nowhere"},
     "nowhere/train is not a directory; expected nowhere/train/<class>/<image> and nowhere/test/<class>/<image>"),
    ("imagefolder", {"imbalance": "source", "data.n_max": "auto", "loss": "focal", "losses.focal.gamma": -1},
     "losses.focal.gamma must be >= 0, got -1"),
])
def test_the_check_refuses_what_build_dataset_refuses_in_its_words(fresh, tiny, dataset, overrides, message):
    """`dataset: digits, ratio: 500` and `data.n_max: 10000` passed the check (row 44 covered cifar's n_max
    only), and an image folder's data.root, ratio and plugin values were looked at only by build-dataset.
    The check now cuts the profile with build-dataset's own rule (data.profiles.profile_counts) from the
    source's fixed counts or the folder's listed files, so both say the same line."""
    raw = override(tiny, {"dataset": dataset, "data.root": str(_folder(fresh / "imgs")), **overrides})
    if "data.root" in overrides:
        raw = override(raw, {"data.root": overrides["data.root"]})
    assert _refused(raw) == message
    if dataset != "cifar10" and "loss" not in overrides:  # cifar10 would need its archive to get that far
        assert _build_refusal(raw, fresh / "out") == message
    assert not (fresh / "out").exists() and not (fresh / "data").exists()


def test_a_folder_and_digits_profile_that_build_dataset_takes_is_taken(fresh, tiny):
    from pipeline.data.profiles import lt_counts
    from pipeline.params import expected_counts

    folder = override(tiny, {"dataset": "imagefolder", "data.root": str(_folder(fresh / "imgs")), "data.n_max": "auto",
                             "imbalance": "source"})
    assert expected_counts(parse(folder)) == [4, 1]
    check_plugins(parse(folder))
    assert expected_counts(parse(tiny)) == lt_counts(40, 10, "exp", 10)  # digits, data.n_max 40
    assert expected_counts(parse(override(tiny, {"data.n_max": "auto", "imbalance": "source"}))) == \
        [128, 132, 127, 133, 131, 132, 131, 129, 124, 130]
