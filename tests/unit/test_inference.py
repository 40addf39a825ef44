"""The shared pieces: one batched-inference loop (engine/inference.py, behind
Trainer.predict/infer, the evaluate stage and the classifier stage's features) and one classifier
re-initialisation (cRT and BALMS)."""

import math

import torch
from torch import nn

from pipeline.data.augment import normalize
from pipeline.engine.inference import batched
from pipeline.methods.classifier_stage import reinit_classifier


def test_batched_equals_one_pass_and_transforms_each_uint8_batch_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    fn = lambda b: b.flatten(1).sum(1)  # noqa: E731
    assert torch.equal(batched(fn, x, mean, std, 3), fn(normalize(x, mean, std)))
    seen = []
    flipped = batched(fn, x, mean, std, 3, transform=lambda b: seen.append(len(b)) or b.flip(3))
    assert seen == [3, 3, 1] and torch.equal(flipped, fn(normalize(x.flip(3), mean, std)))
    assert batched(fn, x[:0], mean, std, 3) is None


def test_one_classifier_reinitialisation_seeded_as_a_new_linear_layer():
    a, b = nn.Linear(64, 10), nn.Linear(64, 10)
    assert reinit_classifier(a, 3) is a
    reinit_classifier(b, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(reinit_classifier(nn.Linear(64, 10), 4).weight, a.weight)
    # PyTorch's nn.Linear default: uniform in +-1/sqrt(64) = +-0.125 (std 0.125 / sqrt(3))
    assert a.weight.abs().max() <= 0.125 and abs(a.weight.std().item() - 0.125 / math.sqrt(3)) < 0.01
    nobias = reinit_classifier(nn.Linear(64, 10, bias=False), 3)
    assert torch.equal(nobias.weight, a.weight)
