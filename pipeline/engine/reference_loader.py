"""The reference-style input pipeline of the authors' scripts (Cao et al. 2019): a map-style dataset of PIL images,
torchvision transforms (RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize) and a
DataLoader. Used to check that the device-resident fast path gives the same results, and by
`longtail bench` as the baseline it is measured against."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class PilDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return self.transform(img), int(self.labels[i])


def train_transform(size: int, pad: int, flip: bool, mean, std):
    from torchvision import transforms as T

    steps = [T.RandomCrop(size, padding=pad)] if pad else []
    steps += [T.RandomHorizontalFlip()] if flip else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def loader(images: np.ndarray, labels: np.ndarray, order: torch.Tensor, batch_size: int, pad: int, flip: bool,
           mean, std, workers: int, seed: int):
    """A DataLoader yielding normalised (x, y) batches in the sampler's order."""
    ds = PilDataset(images, labels, train_transform(images.shape[1], pad, flip, mean, std))
    batches = [b.tolist() for b in order.split(batch_size)]
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=False)
