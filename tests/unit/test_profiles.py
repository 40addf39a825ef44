import numpy as np
import pytest

from pipeline.data.profiles import lt_counts, select_long_tailed
from pipeline.errors import LongtailError

# Published train-set sizes of the LDAM-DRW protocol (docs/methods.md §1).
SIZES = [
    (5000, 10, "exp", 100, 12406), (5000, 10, "exp", 50, 13996), (5000, 10, "exp", 10, 20431),
    (5000, 10, "step", 100, 25250), (5000, 10, "step", 10, 27500),
    (500, 100, "exp", 100, 10847), (500, 100, "exp", 50, 12608), (500, 100, "exp", 10, 19573),
    (500, 100, "step", 100, 25250), (500, 100, "step", 10, 27500),
]


@pytest.mark.parametrize("n_max,c,imbalance,ratio,total", SIZES)
def test_published_train_set_sizes(n_max, c, imbalance, ratio, total):
    counts = lt_counts(n_max, c, imbalance, ratio)
    assert len(counts) == c and sum(counts) == total
    assert counts[0] == n_max and min(counts) == int(n_max / ratio)


def test_cifar10_r100_per_class():
    assert lt_counts(5000, 10, "exp", 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_step_and_balanced_profiles():
    assert lt_counts(5000, 10, "step", 100) == [5000] * 5 + [50] * 5
    assert lt_counts(100, 5, "step", 10) == [100, 100, 10, 10, 10]  # odd C: the extra class is in the tail
    assert lt_counts(500, 100, "exp", 1) == [500] * 100
    assert lt_counts(500, 100, "step", 1.0) == [500] * 100


@pytest.mark.parametrize("kwargs,word", [
    (dict(imbalance="linear", ratio=10), "imbalance"), (dict(imbalance="exp", ratio=0.5), "ratio"),
    (dict(imbalance="exp", ratio="10"), "ratio"), (dict(imbalance="step", ratio=float("nan")), "ratio"),
    (dict(imbalance="exp", ratio=10_000), "ratio"),
])
def test_bad_profile_params(kwargs, word):
    with pytest.raises(LongtailError, match=word):
        lt_counts(5000, 10, **kwargs)


def _pool(per_class=60, classes=4, seed=1):
    labels = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _positions(labels, idx):
    """(class, position of the image within its class) for each selected index."""
    rank = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return sorted(zip(labels[idx].tolist(), rank[idx].tolist()))


def test_selection_follows_ldam_drw_recipe():
    labels, counts = _pool(), [60, 30, 12, 5]
    idx = select_long_tailed(labels, counts, seed=0)
    np.random.seed(0)  # the reference recipe, with the global generator
    ref = []
    for c, n in enumerate(counts):
        i = np.where(labels == c)[0]
        np.random.shuffle(i)
        ref.append(i[:n])
    assert np.array_equal(idx, np.concatenate(ref))
    assert np.bincount(labels[idx]).tolist() == counts and len(set(idx.tolist())) == len(idx)


def test_selection_is_deterministic_and_depends_only_on_class_order():
    a, counts = _pool(seed=1), [60, 30, 12, 5]
    b = _pool(seed=2)  # same classes, different interleaving of the classes
    assert not np.array_equal(a, b)
    assert np.array_equal(select_long_tailed(a, counts), select_long_tailed(a, counts))
    assert _positions(a, select_long_tailed(a, counts)) == _positions(b, select_long_tailed(b, counts))
    assert _positions(a, select_long_tailed(a, counts, seed=0)) != _positions(a, select_long_tailed(a, counts, seed=3))


def test_selection_errors():
    with pytest.raises(LongtailError, match="class 1 has 60"):
        select_long_tailed(_pool(), [10, 61, 5, 5])
    with pytest.raises(LongtailError, match="4 classes"):
        select_long_tailed(np.array([0, 1, 5]), [1, 1, 1, 1])
