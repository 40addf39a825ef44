import pytest

from pipeline.engine.schedule import lr_at


@pytest.mark.parametrize("epoch, expected", [
    (0, 0.02), (1, 0.04), (4, 0.1), (5, 0.1), (159, 0.1), (160, 0.001), (179, 0.001), (180, 0.00001), (199, 0.00001),
])
def test_ldam_drw_schedule(epoch, expected):
    # methods.md §1: warm-up lr*e/5 for e = 1..5, x0.01 from epoch 160, x0.0001 from epoch 180
    assert lr_at(epoch, 0.1, 5, (160, 180), (0.01, 0.0001)) == pytest.approx(expected)


def test_no_warmup_no_milestones():
    assert lr_at(0, 0.5, 0, (), ()) == 0.5


# -- the `schedule` preset (params.yaml): one switch for the 30-epoch protocol -----------------------

def _with(default_params, **top):
    import copy

    raw = copy.deepcopy(default_params)
    raw.update(top)
    return raw


def test_short_schedule_scales_every_epoch_number(default_params):
    from pipeline.params import parse

    p = parse(_with(default_params, schedule="short"))
    assert p.train.epochs == 30
    assert p.train.warmup_epochs == 2  # lr x (e+1)/2 for e = 0, 1
    assert p.train.milestones == (24, 27)  # x0.01 from 24, x0.0001 from 27 (0-based)
    assert p.finetune.start_epoch == 24  # DRW from 24
    lrs = [lr_at(e, p.train.lr, p.train.warmup_epochs, p.train.milestones, p.train.milestone_factors)
           for e in range(30)]
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1]) and lrs[23] == pytest.approx(0.1)
    assert lrs[24] == pytest.approx(0.001) and lrs[26] == pytest.approx(0.001) and lrs[27] == pytest.approx(1e-5)


def test_short_schedule_scales_method_epochs_too(default_params):
    """Two-stage methods write finetune.start_epoch = 200 (stage 1 = whole schedule): 30 under short;
    BBN's milestones 120 / 160 become 18 / 24."""
    from pipeline.params import override, parse

    p = parse(override(default_params, {"schedule": "short", "finetune.start_epoch": 200,
                                        "train.milestones": [120, 160]}))
    assert p.finetune.start_epoch == p.train.epochs == 30
    assert p.train.milestones == (18, 24)


def test_full_schedule_is_as_written(default_params):
    from pipeline.params import parse

    p = parse(default_params)
    assert p.schedule == "full"
    assert (p.train.epochs, p.train.warmup_epochs, p.train.milestones, p.finetune.start_epoch) == (200, 5, (160, 180), 160)


@pytest.mark.parametrize("overrides, message", [
    ({"train.epochs": 30}, "train.milestones [160, 180] must all be below train.epochs (30)"),
    ({"train.epochs": 30}, "set schedule=short"),
    ({"train.milestones": [8, 8], "train.epochs": 10, "finetune.start_epoch": 8}, "strictly increasing"),
    ({"schedule": "tiny"}, "schedule must be one of full, short, got 'tiny'"),
])
def test_inconsistent_schedules_are_rejected(default_params, overrides, message):
    """Setting train.epochs alone never leaves a silently inconsistent schedule."""
    from pipeline.errors import LongtailError
    from pipeline.params import override, parse

    with pytest.raises(LongtailError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse(override(default_params, overrides))
