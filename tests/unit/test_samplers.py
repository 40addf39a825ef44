import pytest
import torch

from pipeline.errors import LongtailError
from pipeline.methods import samplers as S

COUNTS = [400, 150, 40, 10]
LABELS = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
LABELS = LABELS[torch.randperm(600, generator=torch.Generator().manual_seed(0))]  # classes interleaved
WITH_REPLACEMENT = ["class_balanced", "sqrt", "reversed", "progressive"]
ALL = ["instance", "oversample", "undersample", "class_aware"] + WITH_REPLACEMENT


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
    assert len(a) == {"oversample": 1600, "undersample": 40, "class_aware": 1600}.get(name, 600)


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


def test_class_aware_is_the_authors_cycle_of_classes_and_of_each_class_images():
    """Kang et al.'s ClassAwareSampler (num_samples_cls 4): classes in a shuffled cycle, 4 images of the
    visited class per visit, each class's images in a shuffled cycle (every image once per pass)."""
    s = build("class_aware")
    assert s.class_probabilities() == [0.25] * 4
    idx = s.indices(LABELS, 0, 1, torch.Generator().manual_seed(3))
    assert len(idx) == 400 * 4  # n_max x C, their sampler's length
    y = LABELS[idx]
    visits = y.view(-1, 4)
    assert (visits == visits[:, :1]).all()  # 4 images of one class per visit
    cls = visits[:, 0]
    for p in range(len(cls) // 4):  # every pass of the class cycle holds each class once, in a new order
        assert sorted(cls[4 * p:4 * p + 4].tolist()) == [0, 1, 2, 3]
    assert len({tuple(cls[4 * p:4 * p + 4].tolist()) for p in range(len(cls) // 4)}) > 1
    assert torch.bincount(y, minlength=4).tolist() == [400] * 4
    members = [torch.nonzero(LABELS == j).flatten().sort().values for j in range(4)]
    for j, n in enumerate(COUNTS):  # within each pass over class j's n_j images, each appears once
        drawn = idx[y == j]
        for start in range(0, len(drawn) - n + 1, n):
            assert torch.equal(drawn[start:start + n].sort().values, members[j])
    # a batch of 128 (32 whole visits) of 10 classes holds 8 to 20 images of each, in fours (12.8 on average)
    labels10 = torch.arange(10).repeat_interleave(torch.tensor([500, 300, 200, 120, 80, 50, 30, 20, 10, 5]))
    s10 = S.build_class_aware([500, 300, 200, 120, 80, 50, 30, 20, 10, 5])
    per_batch = torch.stack([torch.bincount(labels10[b], minlength=10)
                             for b in s10.indices(labels10, 0, 1, torch.Generator().manual_seed(0)).split(128)[:-1]])
    assert per_batch.min() >= 8 and per_batch.max() <= 20 and (per_batch % 4 == 0).all()
    assert per_batch.float().mean() == 12.8 and per_batch.float().std() > 0
    with pytest.raises(LongtailError, match="samplers.class_aware.per_visit must be an integer >= 1"):
        build("class_aware", per_visit=0)
