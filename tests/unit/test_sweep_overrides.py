"""What `longtail sweep` and `longtail demo` do with the values a user types (--ratio, -S KEY=VALUE)
before anything is queued or run: each bad one is one line (the CLI prints `error: ...`, exit 2)."""

import pytest

from pipeline import demo, sweep
from pipeline.errors import LongtailError

SET_FORMS = "-S takes KEY=VALUE (a params.yaml key with dots), +KEY=VALUE to add a key, ~KEY (or ~KEY=its value) to remove an optional one"


@pytest.mark.parametrize("ratio", ["inf", "1e400", "-inf", "nan"])
def test_a_ratio_that_is_not_finite_is_one_line(default_params, ratio):
    """`--ratio inf` (or 1e400, which reads as inf) gave OverflowError from int(inf), a 46-line traceback;
    nan already had the one line."""
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, losses=["ce"], ratios=["100", ratio])
    assert str(err.value) == f"--ratio values must be finite numbers >= 1, got {ratio!r}"
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, losses=["ce"], ratios=["0.5"])
    assert str(err.value) == "--ratio values must be numbers >= 1, got '0.5'"


def test_removing_a_key_the_params_need_is_refused_and_an_optional_one_is_checked(default_params):
    """`-S '~train.lr='` (DVC's remove-key syntax) was queued unchecked: the check ran on params that still
    had the key, and every experiment then failed. A removal is now applied and the result checked."""
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, losses=["ce"], extra=sweep.parse_set(["~train.lr"]))
    assert str(err.value) == (f"loss=ce seed=0: -S ~train.lr: cannot remove a key the params need (missing key "
                              f"train.lr in params.yaml); {SET_FORMS}")
    for item in ("~train.lr=", "train.lr"):  # DVC refuses ~KEY= itself
        with pytest.raises(LongtailError) as err:
            sweep.parse_set([item])
        assert str(err.value) == f"{SET_FORMS}, got {item!r}"
    # ~KEY=VALUE (Hydra's rule, which DVC applies) removes the key only while it has that value
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, losses=["ce"], extra=sweep.parse_set(["~train.nesterov=true"]))
    assert str(err.value) == ("-S ~train.nesterov=true: train.nesterov is False, not True (~KEY=VALUE removes a key "
                              "only while it has that value; ~KEY removes it whatever it is)")
    combos = sweep.build_grid(default_params, losses=["ce"], extra=sweep.parse_set(["~train.nesterov=false"]))
    assert combos[0].args() == ["-S", "loss=ce", "-S", "seed=0", "-S", "~train.nesterov=false"]
    with pytest.raises(LongtailError) as err:
        sweep.build_grid(default_params, extra=sweep.parse_set(["~train.lrr"]))
    assert str(err.value) == "-S ~train.lrr: params.yaml has no key 'train.lrr' to remove"
    # an optional key (its default applies) may go, and is passed on as DVC takes it: ~KEY
    combos = sweep.build_grid(default_params, losses=["ce"], extra=sweep.parse_set(["~train.nesterov"]))
    assert combos[0].args() == ["-S", "loss=ce", "-S", "seed=0", "-S", "~train.nesterov"]
    with pytest.raises(LongtailError, match="^-S seed clashes with the grid"):
        sweep.build_grid(default_params, extra=sweep.parse_set(["~seed"]))


@pytest.fixture
def demo_here(tmp_path, monkeypatch, default_params):
    """A project folder whose committed params are the project's; running DVC fails the test."""
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "committed_params", lambda: default_params)
    ran = []
    monkeypatch.setattr(demo, "_run_filtered", lambda cmd: ran.append(cmd) or 1)
    return ran


@pytest.mark.parametrize("extra, message", [
    (["-S", "loss=nope"], "loss: unknown losses plugin 'nope' (valid: am, balanced_softmax, ce, focal, hinge, "),
    (["-S", "train.epochz=3"],
     "-S train.epochz: params.yaml has no key 'train.epochz' (prefix the key with + to add one)"),
    (["--set-param=train.lr=-1"], "train.lr must be > 0, got -1"),
    (["-Strain.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["-S", "params.yaml:ratio=0.5"], "ratio must be >= 1, got 0.5"),
    (["-S", "~train.lr"], f"-S ~train.lr: cannot remove a key the params need (missing key train.lr in params.yaml); "
                          f"{SET_FORMS}"),
    (["--temp", "-S", "lr"], f"{SET_FORMS}, got 'lr'"),
])
def test_the_demo_checks_its_overrides_before_dvc_runs(demo_here, extra, message):
    """`longtail demo -S loss=nope` passed the override to `dvc exp run` unchecked: DVC's multi-line output
    and exit code 255. The overrides are now checked as `longtail sweep` checks them, on the params the demo
    runs (the committed ones with dataset=digits), before DVC runs anything."""
    with pytest.raises(LongtailError) as err:
        demo.run(extra, True, lambda *a, **k: None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert demo_here == []


def test_the_demo_runs_valid_overrides_and_leaves_other_arguments_to_dvc(demo_here):
    assert demo.user_sets(["-S", "a=1", "--set-param", "b=2", "-Sc=3", "--set-param=d=4", "-S", "params.yaml:e=5",
                           "-S", "other.yaml:f=6", "-S", "g=x:y", "--temp", "-f"]) == \
        ["a=1", "b=2", "c=3", "d=4", "e=5", "g=x:y"]
    assert demo.run(["-S", "loss=ldam", "-S", "~train.nesterov", "-f"], True, lambda *a, **k: None) == 1
    assert demo_here[0][-5:] == ["-S", "loss=ldam", "-S", "~train.nesterov", "-f"]
    assert demo.run(["-S", "dataset=digits"], True, lambda *a, **k: None) == 1  # the demo's own value, again


@pytest.mark.parametrize("item, message", [
    ("data.root=[x", "-S 'data.root=[x' is not valid in DVC's -S syntax (Hydra's override grammar: no viable "
                     "alternative at input '[x'); quote a value that holds brackets, braces, commas or quotes: "
                     "-S \"data.root='[x'\""),
    ("train.milestones=[1,", "-S 'train.milestones=[1,' is not valid in DVC's -S syntax (Hydra's override grammar: "
                             "no viable alternative at input '[1,'); quote a value that holds brackets, braces, "
                             "commas or quotes: -S \"train.milestones='[1,'\""),
    ("data.root=a,b", "-S 'data.root=a,b' is a Hydra sweep (one DVC experiment per value), which -S here does not "
                      "take: give the grid with --loss/--method/--dataset/--imbalance/--ratio/--seeds, or quote a "
                      "value that holds a comma: -S \"data.root='a,b'\""),
])
def test_a_value_dvc_cannot_parse_is_refused_before_anything_is_queued(demo_here, tmp_path, item, message):
    """`longtail sweep -S 'data.root=[x'` was queued (and --dry-run printed it): `dvc exp run --queue` then
    failed with its support footer as the message, and `longtail demo` with DVC's multi-line error (exit
    255). DVC reads -S with Hydra's override grammar; each value is now parsed with it first. A sweep
    value (a,b) made DVC queue one experiment per value, unchecked."""
    from pathlib import Path

    from testkit import ROOT

    for f in ("params.yaml", "dvc.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    for dry_run in (True, False):
        with pytest.raises(LongtailError) as err:
            sweep.main(Path("params.yaml"), losses=[], methods=[], datasets=[], imbalances=[], ratios=[], seeds=1,
                       extra=[item, "dataset=digits"], name=None, run=False, jobs=1, dry_run=dry_run,
                       echo=lambda *a: None)
        assert str(err.value) == message
    with pytest.raises(LongtailError) as err:
        demo.run(["-S", item], True, lambda *a, **k: None)
    assert str(err.value) == message and demo_here == []
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store is made
    # quoted as the message says, DVC takes it, and the check reads it as DVC does: as text
    quoted = message.rpartition("-S ")[2].strip('"')
    key, _, value = quoted.partition("=")
    assert sweep.parse_set([quoted]) == [(key, value)] and sweep._value(value) == item.partition("=")[2]
