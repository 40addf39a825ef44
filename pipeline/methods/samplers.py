"""Re-sampling (docs/methods.md §3). Entry points of group longtail.samplers.

Contract: build_<name>(class_counts, **params) -> a sampler with
  indices(labels, epoch, epochs, generator) -> 1-D int64 (or int32) tensor: the sample order of one epoch, positions
      0..len(labels)-1 (labels: int64 CPU tensor whose class counts equal class_counts; epoch 0-based;
      CPU generator); checked at every draw (engine.contract.sample_order: anything else is one line),
  class_probabilities(epoch, epochs) -> list[float]: the probability p_j of drawing class j,
  last_pad_scale (optional): None, or an int tensor aligned with the last indices(): the multiplier
      of the random-crop padding for each sample (1 = the usual augmentation). This is how a sampler
      asks the trainer for other augmentation of some samples without the trainer knowing it.
Samplers with replacement draw each sample with probability p_y / n_y, so class j gets p_j.
"""

import torch

from pipeline.errors import LongtailError


def _counts(class_counts) -> list[int]:
    counts = [int(n) for n in class_counts]
    if not counts or min(counts) < 1 or counts != list(class_counts):
        raise LongtailError(f"class_counts must be positive integers, got {list(class_counts)}")
    return counts


class Sampler:
    last_pad_scale = None

    def __init__(self, class_counts):
        self.class_counts = _counts(class_counts)

    def class_probabilities(self, epoch: int = 0, epochs: int = 1) -> list[float]:
        raise NotImplementedError

    def indices(self, labels: torch.Tensor, epoch: int, epochs: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _members(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Sample positions of each class, in order; checks labels against class_counts."""
        if labels.ndim != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {labels.dtype} {list(labels.shape)}")
        counts = torch.bincount(labels, minlength=len(self.class_counts)).tolist()
        if counts != self.class_counts:
            j = next(j for j, (a, b) in enumerate(zip(counts + [0], self.class_counts + [0])) if a != b)
            have, want = (counts + [0])[j], (self.class_counts + [0])[j]
            raise LongtailError(f"the sampler was built for other class counts: class {j} has {have} "
                                f"labels, expected {want} ({len(self.class_counts)} classes)")
        return list(torch.argsort(labels, stable=True).split(counts))

    def _draw(self, labels, p, generator):
        """len(labels) draws with replacement, sample i with probability p[y_i] / n[y_i]."""
        self._members(labels)
        p = torch.tensor(p, dtype=torch.float64) / torch.tensor(self.class_counts, dtype=torch.float64)
        return torch.multinomial(p[labels], len(labels), replacement=True, generator=generator)


class InstanceSampler(Sampler):
    """Instance-balanced (plain) sampling, q = 1: every image once per epoch in random order."""

    def class_probabilities(self, epoch=0, epochs=1):
        total = sum(self.class_counts)
        return [n / total for n in self.class_counts]

    def indices(self, labels, epoch, epochs, generator):
        self._members(labels)
        return torch.randperm(len(labels), generator=generator)


class PowerSampler(Sampler):
    """p_j proportional to n_j^q, len(labels) draws with replacement (Kang et al., ICLR 2020:
    q = 0 class-balanced, q = 1/2 square-root; q = -1 is BBN's reversed sampler, p_j ~ n_max / n_j)."""

    def __init__(self, class_counts, q: float):
        super().__init__(class_counts)
        self.q = q

    def class_probabilities(self, epoch=0, epochs=1):
        w = [n ** self.q for n in self.class_counts]
        return [v / sum(w) for v in w]

    def indices(self, labels, epoch, epochs, generator):
        return self._draw(labels, self.class_probabilities(epoch, epochs), generator)


class ProgressiveSampler(Sampler):
    """Progressively balanced (Kang et al., ICLR 2020): p_j(t) = (1 - t/T) p_j^IB + (t/T) p_j^CB,
    t = epoch, T = epochs; draws with replacement."""

    def class_probabilities(self, epoch=0, epochs=1):
        if not (epochs >= 1 and 0 <= epoch <= epochs):
            raise ValueError(f"need 0 <= epoch <= epochs and epochs >= 1, got epoch={epoch}, epochs={epochs}")
        t = epoch / epochs
        total, c = sum(self.class_counts), len(self.class_counts)
        return [(1 - t) * n / total + t / c for n in self.class_counts]

    def indices(self, labels, epoch, epochs, generator):
        return self._draw(labels, self.class_probabilities(epoch, epochs), generator)


class OversampleSampler(Sampler):
    """Random over-sampling to n_max per class. Rule: each image of class j is kept floor(n_max / n_j)
    times and (n_max mod n_j) of them, drawn without replacement, once more; the epoch (C * n_max
    samples) is then permuted. The first copy of an image is the original, the others are repeats
    (last_repeat_mask). With strong_augment the repeats get doubled crop padding (last_pad_scale 2)."""

    last_repeat_mask = None

    def __init__(self, class_counts, strong_augment: bool = False):
        super().__init__(class_counts)
        if not isinstance(strong_augment, bool):
            raise LongtailError(f"samplers.oversample.strong_augment must be true or false, got {strong_augment!r}")
        self.strong_augment = strong_augment

    def class_probabilities(self, epoch=0, epochs=1):
        return [1 / len(self.class_counts)] * len(self.class_counts)

    def indices(self, labels, epoch, epochs, generator):
        n_max = max(self.class_counts)
        idx, repeat = [], []
        for members in self._members(labels):
            k, r = divmod(n_max, len(members))
            idx += [members.repeat(k), members[torch.randperm(len(members), generator=generator)[:r]]]
            repeat += [torch.arange(k * len(members)) >= len(members), torch.ones(r, dtype=torch.bool)]
        perm = torch.randperm(n_max * len(self.class_counts), generator=generator)
        self.last_repeat_mask = torch.cat(repeat)[perm]
        self.last_pad_scale = 1 + self.last_repeat_mask.long() if self.strong_augment else None
        return torch.cat(idx)[perm]


class _Cycle:
    """The items of `items` in a shuffled order, reshuffled (from `generator`) at the start of each
    pass: every item once per pass."""

    def __init__(self, items: list, generator: torch.Generator):
        self.items, self.generator, self.order, self.i = items, generator, [], 0

    def take(self, k: int) -> list:
        out = []
        for _ in range(k):
            if self.i == len(self.order):
                self.order = [self.items[i] for i in torch.randperm(len(self.items), generator=self.generator).tolist()]
                self.i = 0
            out.append(self.order[self.i])
            self.i += 1
        return out


class ClassAwareSampler(Sampler):
    """Kang et al.'s class-aware sampler (ICLR 2020; their `ClassAwareSampler` with num_samples_cls 4):
    the classes are visited in a shuffled cycle, `per_visit` images of the visited class at a time,
    and each class's images come in a shuffled cycle of their own (no image twice within a pass).
    So every class gets 1/C of the samples, and a batch of b holds about b/C of each. An epoch's
    order has n_max x C samples (their sampler's length). The cycles start afresh each epoch, from
    `generator` (theirs run on across epochs; the order is as random either way, and a resumed run
    draws the same)."""

    def __init__(self, class_counts, per_visit: int = 4):
        super().__init__(class_counts)
        if isinstance(per_visit, bool) or not isinstance(per_visit, int) or per_visit < 1:
            raise LongtailError(f"samplers.class_aware.per_visit must be an integer >= 1, got {per_visit!r}")
        self.per_visit = per_visit

    def class_probabilities(self, epoch=0, epochs=1):
        return [1 / len(self.class_counts)] * len(self.class_counts)

    def indices(self, labels, epoch, epochs, generator):
        members = [m.tolist() for m in self._members(labels)]
        total = max(self.class_counts) * len(members)
        classes = _Cycle(list(range(len(members))), generator)
        cycles = [_Cycle(m, generator) for m in members]
        out: list = []
        while len(out) < total:
            out += cycles[classes.take(1)[0]].take(self.per_visit)
        return torch.tensor(out[:total], dtype=torch.int64)


class UndersampleSampler(Sampler):
    """Random under-sampling: each epoch every class keeps n_min images chosen without replacement,
    then the C * n_min samples are permuted."""

    def class_probabilities(self, epoch=0, epochs=1):
        return [1 / len(self.class_counts)] * len(self.class_counts)

    def indices(self, labels, epoch, epochs, generator):
        n_min = min(self.class_counts)
        idx = [m[torch.randperm(len(m), generator=generator)[:n_min]] for m in self._members(labels)]
        return torch.cat(idx)[torch.randperm(n_min * len(self.class_counts), generator=generator)]


def build_instance(class_counts):
    return InstanceSampler(class_counts)


def build_class_balanced(class_counts):
    return PowerSampler(class_counts, q=0.0)


def build_sqrt(class_counts):
    return PowerSampler(class_counts, q=0.5)


def build_reversed(class_counts):
    return PowerSampler(class_counts, q=-1.0)


def build_progressive(class_counts):
    return ProgressiveSampler(class_counts)


def build_oversample(class_counts, strong_augment: bool = False):
    return OversampleSampler(class_counts, strong_augment)


def build_class_aware(class_counts, per_visit: int = 4):
    return ClassAwareSampler(class_counts, per_visit)


def build_undersample(class_counts):
    return UndersampleSampler(class_counts)
