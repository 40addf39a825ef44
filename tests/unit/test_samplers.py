import pytest
import torch

from pipeline.errors import LongtailError
from pipeline.methods import samplers as S

COUNTS = [400, 150, 40, 10]
LABELS = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
LABELS = LABELS[torch.randperm(600, generator=torch.Generator().manual_seed(0))]  # classes interleaved
WITH_REPLACEMENT = ["class_balanced", "sqrt", "reversed", "progressive"]
ALL = ["instance", "oversample", "undersample"] + WITH_REPLACEMENT


def build(name, **params):
    return getattr(S, f"build_{name}")(COUNTS, **params)


def _frequency_check(sampler, epoch=0, epochs=1, draws=60):
    """Observed class counts over many epochs vs class_probabilities: chi-square and a 5-sigma bound per class."""
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([sampler.indices(LABELS, epoch, epochs, g) for _ in range(draws)])
    obs = torch.bincount(LABELS[idx], minlength=4).double()
    p = torch.tensor(sampler.class_probabilities(epoch, epochs), dtype=torch.float64)
    n = len(idx)
    assert (obs - n * p).abs().le(5 * (n * p * (1 - p)).sqrt()).all(), (obs / n, p)
    assert (((obs - n * p) ** 2) / (n * p)).sum() < 30.7  # chi-square, 3 d.o.f., p = 1e-6


@pytest.mark.parametrize("name,q", [("class_balanced", 0), ("sqrt", 0.5), ("reversed", -1), ("instance", 1)])
def test_class_probabilities_formula(name, q):
    w = [n ** q for n in COUNTS]
    assert build(name).class_probabilities(0, 1) == pytest.approx([v / sum(w) for v in w])


def test_reversed_is_n_max_over_n():
    w = [400 / n for n in COUNTS]
    assert build("reversed").class_probabilities() == pytest.approx([v / sum(w) for v in w])


@pytest.mark.parametrize("name", WITH_REPLACEMENT)
def test_empirical_frequencies_match(name):
    _frequency_check(build(name), epoch=3, epochs=10)


def test_progressive_schedule():
    s = build("progressive")
    assert s.class_probabilities(0, 200) == pytest.approx(build("instance").class_probabilities())
    assert s.class_probabilities(200, 200) == pytest.approx(build("class_balanced").class_probabilities())
    mid = s.class_probabilities(50, 200)
    ib, cb = build("instance").class_probabilities(), build("class_balanced").class_probabilities()
    assert mid == pytest.approx([0.75 * a + 0.25 * b for a, b in zip(ib, cb)])
    _frequency_check(s, epoch=0, epochs=200)
    _frequency_check(s, epoch=200, epochs=200)
    with pytest.raises(ValueError):
        s.class_probabilities(201, 200)


def test_instance_is_a_permutation():
    s = build("instance")
    idx = s.indices(LABELS, 0, 1, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and torch.equal(idx.sort().values, torch.arange(600))
    assert s.last_pad_scale is None


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_generator(name):
    a = build(name).indices(LABELS, 2, 10, torch.Generator().manual_seed(7))
    b = build(name).indices(LABELS, 2, 10, torch.Generator().manual_seed(7))
    c = build(name).indices(LABELS, 2, 10, torch.Generator().manual_seed(8))
    assert a.dtype == torch.int64 and torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == {"oversample": 1600, "undersample": 40}.get(name, 600)


def test_oversample_counts_and_repeat_mask():
    s = build("oversample", strong_augment=True)
    assert s.strong_augment is True and s.class_probabilities() == [0.25] * 4
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        idx = s.indices(LABELS, 0, 1, g)
        mask = s.last_repeat_mask
        assert mask.dtype == torch.bool and mask.shape == idx.shape
        assert torch.bincount(LABELS[idx], minlength=4).tolist() == [400] * 4
        # every original appears exactly once unmarked; the marked copies pad each class up to n_max
        assert torch.equal(idx[~mask].sort().values, torch.arange(600))
        assert torch.bincount(LABELS[idx[mask]], minlength=4).tolist() == [400 - n for n in COUNTS]
        # each image of class j appears floor(n_max / n_j) or one more times
        per_image = torch.bincount(idx, minlength=600)
        for j, n in enumerate(COUNTS):
            k = per_image[LABELS == j]
            assert k.min() >= 400 // n and k.max() <= 400 // n + (400 % n > 0)
        assert LABELS[idx[:50]].unique().numel() > 1  # shuffled, not grouped by class
        # what the trainer sees: doubled crop padding for the copies, through the general interface
        assert torch.equal(s.last_pad_scale, 1 + mask.long())
    assert build("oversample").strong_augment is False
    plain = build("oversample")
    plain.indices(LABELS, 0, 1, torch.Generator().manual_seed(3))
    assert plain.last_pad_scale is None


def test_undersample_counts():
    s = build("undersample")
    g = torch.Generator().manual_seed(0)
    first = s.indices(LABELS, 0, 1, g)
    assert torch.bincount(LABELS[first], minlength=4).tolist() == [10] * 4 and first.unique().numel() == 40
    assert not torch.equal(first.sort().values, s.indices(LABELS, 1, 1, g).sort().values)  # a new subset per epoch
    assert s.class_probabilities() == [0.25] * 4


def test_errors():
    with pytest.raises(LongtailError, match="samplers.oversample.strong_augment"):
        build("oversample", strong_augment="yes")
    with pytest.raises(LongtailError, match="class_counts"):
        S.build_sqrt([3, 0])
    with pytest.raises(LongtailError, match="class 0 has 1 labels, expected 400"):
        build("sqrt").indices(torch.tensor([0, 1, 2, 3]), 0, 1, torch.Generator())
