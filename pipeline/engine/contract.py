"""The contract between the trainer and a fine-tune strategy that trains with its own steps.

A strategy supplies only what differs from plain training: the learning rate of an epoch, the
batches of an epoch and the loss of one batch (built on the parameters it put in
`trainer.optimizer`). The trainer (`Trainer.fit(until, steps=...)`) owns everything else: the
epoch loop, the non-finite guard, the optimizer step (with train.clip_grad_norm), evaluation,
the history row, best-epoch tracking and the resume checkpoints. A strategy with state of its own
(e.g. learned sampling logits) returns it from `state_dict` and gets it back from
`load_state_dict`, so a killed stage resumes bit for bit.

What a strategy may use of the trainer: `model`, `optimizer` (it may replace it), `data`,
`device`, `cfg`, `sample_gen` / `aug_gen` (the checkpointed RNGs: draw only from them), `epoch`,
`loss(logits, y, weight=None, feats=None)` (the configured loss plugin), `prepare(idx)` (augmented,
normalised training images), `augment(x)` (the training augmentation of a uint8 batch),
`infer(fn, x, transform=None)` (batched inference), `autocast()`, `reset_best()`, `best` (a
strategy that transforms the model after training, e.g. folds learned per-class scales into the
classifier, updates the best-epoch weights too), `fit(...)`. tests/unit/test_architecture.py
checks that strategies use nothing else."""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Protocol, runtime_checkable

import torch

from .. import registry
from ..errors import LongtailError


class StepResult(NamedTuple):
    """One batch's outcome: the float32 loss to minimise, the logits (checked for finiteness),
    the number of correct predictions (a float for mixed targets) and of samples."""

    loss: torch.Tensor
    logits: torch.Tensor
    correct: torch.Tensor | float
    count: int


@runtime_checkable
class Steps(Protocol):
    """What a strategy hands `Trainer.fit`. Optional attributes: `reweighted` (bool, for the history
    row), `images_per_sample` (images the model sees per sample, e.g. 2 for two branches),
    `state_dict()` / `load_state_dict(state)` (strategy state kept in the resume checkpoint)."""

    def lr(self, epoch: int) -> float:
        """The learning rate of epoch `epoch` (the trainer sets it on every optimizer group)."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of epoch `epoch`, each handed to `loss`; draw randomness from the trainer's
        generators only."""

    def loss(self, batch: Any) -> StepResult:
        """The loss of one batch (the trainer then steps its optimizer)."""


def sample_order(sampler, labels: torch.Tensor, epoch: int, epochs: int, generator: torch.Generator) -> torch.Tensor:
    """`sampler.indices(labels, epoch, epochs, generator)`, checked where it is drawn (plain training and every
    strategy that samples): the sampler contract (pipeline/methods/samplers.py) asks for a 1-D integer tensor of
    positions 0..N-1 into the N training labels. Anything else is one line naming the plugin, before any batch."""
    order = sampler.indices(labels, epoch, epochs, generator)
    n = len(labels)
    if not isinstance(order, torch.Tensor):
        got = f"a {type(order).__name__}, not a tensor"
    elif order.ndim != 1 or order.dtype not in (torch.int64, torch.int32):
        got = f"a {str(order.dtype).removeprefix('torch.')} tensor of shape {list(order.shape)}"
    elif len(order) and (int(order.min()) < 0 or int(order.max()) >= n):
        got = f"indices {int(order.min())}..{int(order.max())}, outside 0..{n - 1}"
    else:
        return order
    raise LongtailError(f"{registry.describe(sampler)} returned {got} from indices() for epoch {epoch + 1}; a sampler "
                        f"must return positions 0..{n - 1} of the {n} training images as a 1-D int64 (or int32) tensor")
