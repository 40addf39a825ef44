"""Batched inference over device-resident uint8 images: the one loop behind evaluation
(Trainer.predict, the evaluate stage) and feature extraction (the classifier-stage toolkit)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from ..data.augment import normalize


@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x_uint8: torch.Tensor, mean: torch.Tensor,
            std: torch.Tensor, batch_size: int, autocast: Callable = nullcontext, channels_last: bool = False,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
    """fn(normalised batch) for consecutive batches of `x_uint8`, concatenated (None for no image).
    `transform` (e.g. augmentation) runs on each uint8 batch before normalisation."""
    out = []
    for i in range(0, len(x_uint8), batch_size):
        x = x_uint8[i:i + batch_size]
        if transform is not None:
            x = transform(x)
        x = normalize(x, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out.append(fn(x))
    return torch.cat(out) if out else None
