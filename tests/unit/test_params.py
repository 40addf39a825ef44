import copy

import pytest

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
    (lambda d: d["train"].update(epochs=0), "train.epochs must be >= 1"),
    (lambda d: d["train"].update(sampler="magic"), "train.sampler: unknown samplers plugin 'magic'"),
    (lambda d: d["finetune"].update(reweighting="x"), "finetune.reweighting: unknown reweighting plugin 'x'"),
    (lambda d: d["model"].update(arch="vgg"), "model.arch: unknown models plugin 'vgg'"),
    (lambda d: d["train"].update(lr="fast"), "train.lr must be a number"),
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
