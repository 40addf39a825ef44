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
