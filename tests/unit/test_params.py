import copy

import pytest

from testkit import ROOT

from pipeline.errors import LongtailError
from pipeline.params import load, parse


def test_default_params_are_valid(default_params):
    p = parse(default_params)
    assert (p.dataset, p.imbalance, p.ratio, p.loss) == ("cifar10", "exp", 100.0, "ce")
    assert p.train.milestones == (160, 180) and p.train.milestone_factors == (0.01, 0.0001)
    assert p.finetune.start_epoch == 160 and p.finetune.reweighting == "cb"
    assert p.reweighting_params["cb"] == {"beta": 0.9999}
    assert p.train.pad is None and p.train.flip is None  # auto


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(ratio=0.5), "ratio must be >= 1"),
    (lambda d: d.update(loss="nope"), "loss: unknown losses plugin 'nope' (valid: "),
    (lambda d: d.update(dataset="mnist"), "dataset must be one of cifar10, cifar100, imagefolder, digits"),
    (lambda d: d.update(imbalance="linear"), "imbalance must be one of exp, step"),
    (lambda d: d["finetune"].update(start_epoch=250), "finetune.start_epoch (250) is beyond the last epoch"),
    # BBN runs the whole schedule as its fine-tune stage: a train.* re-balancing would be ignored (row 78)
    (lambda d: (d["finetune"].update(start_epoch=0, reweighting="none"), d["train"].update(reweighting="cb")),
     "finetune.start_epoch=0 leaves the train.* re-balancing no epoch, so train.reweighting=cb would be silently "
     "ignored: set train.reweighting=none and train.sampler=instance (finetune.* covers the whole run)"),
    (lambda d: d["train"].update(epochs=0), "train.epochs must be >= 1"),
    (lambda d: d["train"].update(sampler="magic"), "train.sampler: unknown samplers plugin 'magic'"),
    (lambda d: d["finetune"].update(reweighting="x"), "finetune.reweighting: unknown reweighting plugin 'x'"),
    (lambda d: d["model"].update(arch="vgg"), "model.arch: unknown models plugin 'vgg'"),
    (lambda d: d["train"].update(lr="fast"), "train.lr must be a finite number"),
    (lambda d: d["train"].update(milestones=[180, 160]), "train.milestones must be strictly increasing"),
    (lambda d: d["train"].update(milestone_factors=[0.1]), "must be lists of the same length"),
    (lambda d: d["train"].update(flip="maybe"), "train.flip must be true, false or auto"),
    (lambda d: d["train"].update(device="tpu"), "train.device must be one of auto, cpu, cuda"),
    (lambda d: d["data"].update(n_max=0), "data.n_max must be >= 1"),
    (lambda d: d.pop("seed"), "missing key seed"),
    (lambda d: d.update(losses={"ce": [1, 2]}), "losses.ce must be a mapping"),
])
def test_bad_params_name_the_key(default_params, change, message):
    raw = copy.deepcopy(default_params)
    change(raw)
    with pytest.raises(LongtailError) as err:
        parse(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_loss_lists_the_valid_ones(default_params):
    raw = dict(default_params, loss="nope")
    with pytest.raises(LongtailError, match=r"valid: .*\bce\b"):
        parse(raw)


def test_load_reports_missing_and_broken_files(tmp_path):
    with pytest.raises(LongtailError, match="not found"):
        load(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(LongtailError, match="not valid YAML"):
        load(bad)


def _line(start: str) -> int:
    """The line of the project's params.yaml that starts with `start` (1-based)."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.startswith(start))


@pytest.mark.parametrize("edit, message", [
    (lambda text: text + "\nloss: ldam\n", f"the key 'loss' is given twice (first at line {_line('loss:')}); keep one"),
    (lambda text: text.replace("  lr: 0.1", "  lr: 0.1\n  lr: 0.2", 1), "the key 'lr' is given twice"),
])
def test_a_key_given_twice_is_refused_not_last_one_wins(tmp_path, edit, message):
    """Fault-injection pass: PyYAML kept the last of two equal keys, so an edit lower in the file
    silently overrode one above it."""
    twice = tmp_path / "params.yaml"
    twice.write_text(edit((ROOT / "params.yaml").read_text()))
    with pytest.raises(LongtailError) as err:
        load(twice)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"params file {twice} is not valid YAML (line ")


def test_the_duplicate_key_check_keeps_merge_keys_and_plain_yaml_errors():
    """Review of the duplicate-key check: `<<: *anchor` merges (its keys may be overridden), in a file
    and in a -S value; an unhashable key is still PyYAML's own error; a doubled key in a flow mapping
    on one line is caught too."""
    import yaml

    assert yaml_load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 5\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 5, "y": 2}}
    assert yaml_value("{<<: {x: 1}, x: 2}") == {"x": 2}
    with pytest.raises(yaml.YAMLError, match="found unhashable key"):
        yaml_load("[seed]: 1\n")
    with pytest.raises(yaml.YAMLError, match="the key 'a' is given twice"):
        yaml_load("{a: 1, a: 2}")


# -- every key and number checked, plugin params bound before any work

from pipeline.checks import yaml_load, yaml_value  # noqa: E402
from pipeline.methods import decoupling, meta_sampler, reweighting  # noqa: E402
from pipeline.models import bbn as bbn_model  # noqa: E402
from pipeline.params import check_plugins, override  # noqa: E402


@pytest.mark.parametrize("overrides, message", [
    ({"train.epoch": 5}, "unknown key train.epoch in params.yaml (did you mean train.epochs?)"),
    ({"lossses": "ldam"}, "unknown key lossses in params.yaml (did you mean losses?)"),
    ({"data.rot": "x"}, "unknown key data.rot in params.yaml (did you mean data.root?)"),
    ({"losses.foacl": {}}, "unknown key losses.foacl in params.yaml (did you mean losses.focal?)"),
    ({"train.lr": float("nan")}, "train.lr must be a finite number, got nan"),
    ({"train.weight_decay": float("inf")}, "train.weight_decay must be a finite number, got inf"),
    ({"losses.focal.gamma": float("nan")}, "losses.focal.gamma must be a finite number, got nan"),
    ({"finetunes.tau_norm.grid": [0.1, float("inf")]}, "finetunes.tau_norm.grid[1] must be a finite number"),
    # fault-injection pass: a list element's error named no element ("train.milestones[] must be >= 0")
    ({"train.milestones": [160, -1]}, "train.milestones[1] must be >= 0, got -1"),
    ({"train.milestone_factors": [0.01, 0]}, "train.milestone_factors[1] must be > 0, got 0"),
    ({"train.milestones": [8, 8]}, "train.milestones must be strictly increasing, got [8, 8]"),
    ({"train.milestones": [160, 200]}, "must all be below train.epochs (200)"),
    ({"data.root": None}, "data.root must be a folder path (e.g. data/raw), got None"),
    ({"data.n_max": "all"}, "data.n_max must be an integer, got 'all' (or auto)"),
    ({"imbalance": "source", "data.n_max": 50}, "data.n_max (50) does not apply to imbalance source, which keeps "
                                                "every training image of the source (valid: auto; "),
    ({"imbalance": "none"}, "imbalance must be one of exp, step, source, got 'none'"),
    ({"dataset": "imagefolder", "data.image_size": 0}, "data.image_size must be >= 1, got 0 (or auto)"),
    ({"dataset": "imagefolder", "data.image_size": "32px"}, "data.image_size must be an integer, got '32px' (or auto)"),
    ({"data.image_size": 32}, "data.image_size (32) applies to dataset imagefolder only; cifar10 has one image size "
                              "already (valid: auto)"),
    # fault-injection pass: these passed the check and then crashed MLflow in a stage
    ({"tracking.experiment": ""}, "tracking.experiment must be an MLflow experiment name, a non-empty string"),
    ({"tracking.experiment": "  "}, "tracking.experiment must be an MLflow experiment name"),
    ({"tracking.experiment": None}, "tracking.experiment must be an MLflow experiment name"),
    ({"tracking.experiment": 123}, "tracking.experiment must be an MLflow experiment name"),
    ({"train.nesterov": "yes"}, "train.nesterov must be true or false, got 'yes'"),
    ({"train.nesterov": True, "train.momentum": 0}, "train.nesterov=true needs momentum: set train.momentum above 0"),
])
def test_parse_rejects_with_the_dotted_key(default_params, overrides, message):
    with pytest.raises(LongtailError) as err:
        parse(override(default_params, overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_image_size_is_optional_auto_or_a_side(default_params):
    """data.image_size came after params.yaml files that lack it: they keep working, as auto."""
    assert parse(default_params).data.image_size is None
    old = copy.deepcopy(default_params)
    del old["data"]["image_size"]
    assert parse(old).data.image_size is None
    assert parse(override(default_params, {"dataset": "imagefolder", "data.image_size": 32})).data.image_size == 32


@pytest.mark.parametrize("overrides, message", [
    ({"losses.focal.gama": 2}, "unknown key losses.focal.gama in params.yaml (did you mean losses.focal.gamma?)"),
    ({"finetunes.crt.sampler": "class_balancd"},
     "finetunes.crt.sampler: unknown samplers plugin 'class_balancd' (did you mean class_balanced?)"),
    ({"finetunes.crt.epochs": -1}, "finetunes.crt.epochs must be >= 1, got -1"),
    ({"finetunes.tau_norm.grid": [0.5, -1]}, "finetunes.tau_norm.grid[1] must be >= 0, got -1"),
    ({"finetune.strategy": "crt", "finetunes.crt.epochs": -1}, "finetunes.crt.epochs must be >= 1"),
    ({"reweightings.cb.beta": 1.5}, "reweightings.cb.beta must be < 1, got 1.5"),
    ({"model.width": 2}, "model.width: resnet32 takes no parameters"),
    # fault-injection pass: a classifier-only stage 2 after a partial stage 1 failed only after all of stage 1
    ({"finetune.strategy": "crt"}, "finetune.strategy=crt re-trains only the classifier after stage 1 has run the "
                                   "whole schedule: set finetune.start_epoch to train.epochs (200), not 160"),
    ({"finetune.strategy": "ncm"}, "finetune.strategy=ncm re-trains only the classifier"),
    ({"finetune.strategy": "meta_sampler"}, "finetune.strategy=meta_sampler re-trains only the classifier"),
    # a strategy that picks its own batches and weights ignored params.yaml's DRW (finetune.reweighting: cb),
    # and the run was labelled ce+DRW:cb+FT:bbn (reliability row 78)
    ({"loss": "ce", "model.arch": "bbn_resnet32", "finetune.strategy": "bbn", "finetune.start_epoch": 0},
     "finetune.strategy=bbn does not use finetune.reweighting / finetune.sampler (its settings are finetunes.bbn), "
     "so finetune.reweighting=cb would be silently ignored: set finetune.reweighting=none and "
     "finetune.sampler=instance (`longtail sweep --method NAME` sets them)"),
    ({"finetune.strategy": "crt", "finetune.start_epoch": 200, "finetune.reweighting": "none",
      "finetune.sampler": "class_balanced"}, "finetune.strategy=crt does not use finetune.reweighting / "
                                             "finetune.sampler (its settings are finetunes.crt), so "
                                             "finetune.sampler=class_balanced would be silently ignored"),
    ({"finetune.strategy": "meta_sampler", "finetune.start_epoch": 200},
     "so finetune.reweighting=cb would be silently ignored"),
    ({"finetune.strategy": "tau_norm", "finetune.start_epoch": 200}, "finetune.strategy=tau_norm does not use"),
    ({"finetune.strategy": "lws", "finetune.start_epoch": 200}, "finetune.strategy=lws does not use"),
    ({"finetune.strategy": "ncm", "finetune.start_epoch": 200, "finetune.reweighting": "none",
      "finetune.sampler": "class_aware"}, "so finetune.sampler=class_aware would be silently ignored"),
])
def test_plugin_params_are_bound_and_built_before_any_work(default_params, overrides, message):
    p = parse(override(default_params, overrides))
    with pytest.raises(LongtailError) as err:
        check_plugins(p, class_counts=[50, 5])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("build, message", [
    (lambda: decoupling.build_crt(lr=float("inf")), "finetunes.crt.lr must be a finite number, got inf"),
    (lambda: decoupling.build_lws(momentum=float("nan")), "finetunes.lws.momentum must be a finite number, got nan"),
    (lambda: decoupling.build_tau_norm(tau=float("nan")), "finetunes.tau_norm.tau must be a finite number, got nan"),
    (lambda: meta_sampler.build_meta_sampler(temperature=float("inf")),
     "finetunes.meta_sampler.temperature must be a finite number, got inf"),
    (lambda: reweighting.build_inverse([5, 1], power=float("inf")),
     "reweightings.inverse.power must be a finite number, got inf"),
    (lambda: bbn_model.build_bbn_resnet32(10, branch_blocks=1.5), "model.branch_blocks must be an integer, got 1.5"),
])
def test_built_in_plugins_check_numbers_with_the_one_validator(build, message):
    """One number validator (checks.check_number) for the built-in plugins too, so a
    non-finite value is refused everywhere, with the same wording."""
    with pytest.raises(LongtailError) as err:
        build()
    assert str(err.value) == message


def test_a_misspelt_required_key_is_named_where_its_section_takes_free_keys(default_params):
    """model holds the model plugin's params besides model.arch, so `archh` is not an unknown key there:
    the missing model.arch names it."""
    raw = copy.deepcopy(default_params)
    raw["model"] = {"archh": "resnet32"}
    with pytest.raises(LongtailError) as err:
        parse(raw)
    assert str(err.value) == "missing key model.arch in params.yaml (model.archh is there: did you mean model.arch?)"


def test_a_selected_plugin_without_a_section_runs_with_its_defaults(default_params):
    raw = override(default_params, {"loss": "focal"})
    del raw["losses"]["focal"]
    p = parse(raw)
    check_plugins(p, class_counts=[50, 5])
    assert p.loss_params == {}


def test_scientific_notation_is_a_number(tmp_path):
    assert yaml_load("lr: 1e-3\nb: 5E+2\nc: .5\nd: '1e-3'\ne: 1_0") == {"lr": 0.001, "b": 500.0, "c": 0.5,
                                                                       "d": "1e-3", "e": 10}
    assert yaml_value("1e-3") == 0.001 and yaml_value("[1, 2]") == [1, 2] and yaml_value("a: [") == "a: ["
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("lr: 0.1", "lr: 1e-1"))
    assert load(path).train.lr == 0.1


@pytest.mark.parametrize("typed, message", [
    ("  lr: .nan", "train.lr must be a finite number, got nan"),
    ("  lr: -.inf", "train.lr must be a finite number, got -inf"),
    ("  weight_decay: .inf", "train.weight_decay must be a finite number, got inf"),
])
def test_nan_and_inf_as_typed_in_params_yaml_are_rejected(tmp_path, typed, message):
    """YAML's .nan / .inf, read from the file."""
    text = (ROOT / "params.yaml").read_text()
    key = typed.split(":")[0]
    line = next(x for x in text.splitlines() if x.startswith(key + ":"))
    (tmp_path / "params.yaml").write_text(text.replace(line, typed))
    with pytest.raises(LongtailError) as err:
        load(tmp_path / "params.yaml")
    assert str(err.value) == message


def test_discovery_runs_once_per_process(default_params, monkeypatch):
    from pipeline import registry

    calls = []
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    monkeypatch.setattr(registry, "_CACHE", {})
    check_plugins(parse(default_params), class_counts=[50, 5])
    check_plugins(parse(default_params), class_counts=[50, 5])
    assert len(calls) <= len(registry.GROUPS)


@pytest.mark.parametrize("overrides, message", [
    ({"finetunes.crt.sampler": "class_balancd"},
     "error: finetunes.crt.sampler: unknown samplers plugin 'class_balancd' (did you mean class_balanced?)"),
    ({"finetunes.crt.epochs": -1}, "error: finetunes.crt.epochs must be"),
])
def test_longtail_check_rejects_a_bad_crt_value_in_one_line_before_any_work(default_params, overrides, message,
                                                                             tmp_path, monkeypatch, capsys):
    """`longtail check` fails on either value with one line, exit 2, writing nothing;
    the fine-tune strategy (crt) is not even selected, so nothing later would have caught it first. Every
    stage command checks the same way before it starts (no dataset, model, store or lock is made)."""
    import sys

    import yaml

    from pipeline import cli

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(override(default_params, overrides)))
    monkeypatch.chdir(tmp_path)
    for command in (["check"], ["build-dataset", "--no-track"], ["pretrain", "--no-track"],
                    ["finetune", "--no-track"], ["evaluate", "--no-track"]):
        monkeypatch.setattr(sys, "argv", ["longtail", *command])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(message), (command, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], command


@pytest.mark.parametrize("milestones, factors, message", [
    ("[1,", [0.1], "train.milestones must be a list of epoch numbers, got '[1,'"),
    ({"a": 1}, [0.1], "train.milestones must be a list of epoch numbers, got {'a': 1}"),
    ([160], 0.1, "train.milestone_factors must be a list of lr factors, got 0.1"),
    ([160, 180], [0.1], "train.milestones and train.milestone_factors must be lists of the same length (one lr "
                        "factor per milestone), got 2 and 1 values"),
])
def test_a_malformed_milestone_list_names_the_key_and_what_it_got(default_params, milestones, factors, message):
    """A non-list train.milestones said `train.milestones and train.milestone_factors must be lists of the
    same length`, naming both keys and neither value, when only one was malformed."""
    raw = copy.deepcopy(default_params)
    raw["train"].update(milestones=milestones, milestone_factors=factors)
    with pytest.raises(LongtailError) as err:
        parse(raw)
    assert str(err.value) == message


def test_errors_about_a_params_file_name_that_file(tmp_path, default_params):
    """`longtail check -p /dev/null` said `params.yaml must be a mapping of keys to values`, and a truncated
    -p file `missing key train in params.yaml`: the file at fault is named, also by the plugin checks."""
    import yaml

    from pipeline.params import check_plugins

    with pytest.raises(LongtailError) as err:
        load("/dev/null")
    assert str(err.value) == "/dev/null must be a mapping of keys to values, got nothing (it is empty)"
    path = tmp_path / "mine.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(LongtailError) as err:
        load(path)
    assert str(err.value) == f"{path} must be a mapping of keys to values, got ['a', 'b']"
    raw = copy.deepcopy(default_params)
    del raw["train"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LongtailError) as err:
        load(path)
    assert str(err.value) == f"missing key train in {path}"
    raw = copy.deepcopy(default_params)
    raw["train"]["epoch"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LongtailError) as err:
        load(path)
    assert str(err.value) == f"unknown key train.epoch in {path} (did you mean train.epochs?)"
    raw = copy.deepcopy(default_params)
    raw["losses"]["focal"]["gama"] = 2
    path.write_text(yaml.safe_dump(raw))
    p = load(path)
    with pytest.raises(LongtailError) as err:
        check_plugins(p)
    assert str(err.value) == f"unknown key losses.focal.gama in {path} (did you mean losses.focal.gamma?)"
    with pytest.raises(LongtailError) as err:  # the settings of params.yaml (sweep, demo) say so, as before
        parse({**default_params, "train": {**default_params["train"], "epoch": 3}})
    assert str(err.value) == "unknown key train.epoch in params.yaml (did you mean train.epochs?)"


@pytest.mark.parametrize("strategy, arch, start", [("crt", "resnet32", 200), ("tau_norm", "resnet32", 200),
                                                   ("lws", "resnet32", 200), ("ncm", "resnet32", 200),
                                                   ("meta_sampler", "resnet32", 200), ("bbn", "bbn_resnet32", 0)])
def test_a_strategy_with_its_own_batches_passes_with_plain_finetune_rebalancing(default_params, strategy, arch, start):
    check_plugins(parse(override(default_params, {"finetune.strategy": strategy, "model.arch": arch,
                                                  "finetune.start_epoch": start, "finetune.reweighting": "none"})),
                  class_counts=[50, 5])


def test_plain_rebalancing_values_are_the_method_names_plain_ones():
    from pipeline.method_names import MethodNames
    from pipeline.params import PLAIN_REBALANCING

    plain = MethodNames.load().plain
    for phase in ("train", "finetune"):
        assert {k: plain[f"{phase}.{k}"] for k in PLAIN_REBALANCING} == PLAIN_REBALANCING


def test_a_run_that_stops_before_its_deferred_phase_is_still_accepted(default_params):
    """A one-epoch smoke run (train.epochs = finetune.start_epoch = 1) with params.yaml's DRW is common and
    harmless: the label names the DRW it would have had. Only a strategy that never uses finetune.* is refused."""
    check_plugins(parse(override(default_params, {"train.epochs": 1, "train.warmup_epochs": 0, "train.milestones": [],
                                                  "train.milestone_factors": [], "finetune.start_epoch": 1})),
                  class_counts=[50, 5])
