"""Classifier heads: what the loss asks for (``loss.head``) decides which one the model gets."""

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """z_j = cos(f, w_j): features and class weights both L2-normalised (Cao et al., NeurIPS 2019,
    the "normed linear" layer used by LDAM and MM). The scale s is applied inside the loss."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "linear_nobias":  # L-Softmax works on W_j . x exactly (Liu et al., ICML 2016)
        return nn.Linear(in_features, num_classes, bias=False)
    if kind == "cosine":
        return CosineLinear(in_features, num_classes)
    from ..errors import LongtailError

    raise LongtailError(f"unknown head {kind!r} asked for by the loss (valid: linear, cosine)")
