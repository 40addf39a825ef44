"""Batched, device-side augmentation of uint8 image batches [B, C, H, W] (no per-sample python loop)."""

import torch


def crop_flip(x: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor,
              pad: int) -> torch.Tensor:
    """Zero-pad by `pad` on each side, crop H x W at (offsets_y[b], offsets_x[b]) of the padded image,
    then mirror left-right where flips[b]: torchvision's pad -> crop -> hflip, done for the whole batch."""
    B, C, H, W = x.shape
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offsets_y.to(x.device).view(B, 1) + torch.arange(H, device=x.device)  # [B, H]
    cols = offsets_x.to(x.device).view(B, 1) + torch.arange(W, device=x.device)  # [B, W]
    cols = torch.where(flips.to(x.device).view(B, 1), cols.flip(1), cols)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return x[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding (offsets uniform in 0..2*pad, per sample) and, if `flip`, a
    horizontal flip with probability 0.5 per sample: the CIFAR augmentation of He et al. (2016)."""
    if pad == 0 and not flip:
        return x
    B, dev = x.shape[0], generator.device
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator, device=dev)
    if flip:
        flips = torch.randint(0, 2, (B,), generator=generator, device=dev).bool()
    else:
        flips = torch.zeros(B, dtype=torch.bool)
    return crop_flip(x, oy, ox, flips, pad)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x / 255 - mean) / std per channel, for uint8 [..., C, H, W]; returns float32."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.float() / 255 - mean) / std
