import pytest

from pipeline.errors import LongtailError
from pipeline.methods.reweighting import build_cb, build_inverse, build_none

C10_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cb_gives_the_drw_weights():
    w = build_cb(C10_R100)
    assert [round(v, 3) for v in w] == [0.051, 0.077, 0.121, 0.195, 0.319, 0.525, 0.868, 1.443, 2.409, 3.993]
    assert sum(w) == pytest.approx(10)


def test_cb_small_beta_is_uniform_and_hand_computed():
    assert build_cb([100, 10, 1], beta=0.0) == pytest.approx([1, 1, 1])
    # beta = 0.5: (1 - b) / (1 - b^n) = 1 / (2 (1 - 2^-n)) -> n=1: 1, n=2: 2/3; normalised to sum 2
    assert build_cb([1, 2], beta=0.5) == pytest.approx([2 * 1 / (1 + 2 / 3), 2 * (2 / 3) / (1 + 2 / 3)])


def test_inverse_hand_computed():
    assert build_inverse([1, 4]) == pytest.approx([1.6, 0.4])  # 1, 1/4 -> mean 1
    assert build_inverse([1, 4], power=0.5) == pytest.approx([4 / 3, 2 / 3])  # 1, 1/2
    assert build_inverse([100, 10, 1], power=0) == pytest.approx([1, 1, 1])
    w = build_inverse(C10_R100)
    assert sum(w) / len(w) == pytest.approx(1) and w[0] * 5000 == pytest.approx(w[-1] * 50)


def test_none():
    assert build_none([5, 3, 1]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("build,kwargs,key", [
    (build_cb, dict(beta=1.0), "reweightings.cb.beta"), (build_cb, dict(beta=-0.1), "reweightings.cb.beta"),
    (build_cb, dict(beta="0.99"), "reweightings.cb.beta"), (build_cb, dict(beta=True), "reweightings.cb.beta"),
    (build_inverse, dict(power=-1), "reweightings.inverse.power"),
    (build_inverse, dict(power=None), "reweightings.inverse.power"),
])
def test_bad_params(build, kwargs, key):
    with pytest.raises(LongtailError, match=key.replace(".", r"\.")):
        build([10, 5], **kwargs)


@pytest.mark.parametrize("counts", [[], [5, 0], [5, 2.5]])
def test_bad_counts(counts):
    with pytest.raises(LongtailError, match="class_counts"):
        build_inverse(counts)
