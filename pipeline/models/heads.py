"""Classifier heads: what the loss asks for (``loss.head``) decides which one the model gets."""

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """z_j = cos(f, w_j): features and class weights both L2-normalised (Cao et al., NeurIPS 2019,
    the "normed linear" layer used by LDAM and MM). The scale s is applied inside the loss.

    Initialised as the authors' NormedLinear: uniform(-1, 1), then each class vector w_j rescaled to
    unit norm. The angular step of w_j scales as 1/|w_j|^2, so rows of the raw uniform draw's norm
    (about sqrt(D/3), 4.6 for D = 64) would learn about 21x slower at the start."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        w = torch.empty(num_classes, in_features).uniform_(-1, 1)
        self.weight = nn.Parameter(w.renorm(2, 0, 1e-5).mul(1e5))  # rows: norm 1e-5, then x 1e5

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class NormalizedLinear(nn.Module):
    """z = W f^ + b on centred, L2-normalised features f^ = (f - c)/|f - c| (c: the `center` buffer,
    0 = plain L2 normalisation). With w_j = 2 mu_j and b_j = -|mu_j|^2 its argmax is the nearest class
    mean mu_j in Euclidean distance, since |f^ - mu_j|^2 = |f^|^2 - (2 f^.mu_j - |mu_j|^2) and |f^|^2 is
    the same for every j (the NCM classifier of Kang et al., ICLR 2020; filled in by the `ncm`
    fine-tune strategy)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.register_buffer("center", torch.zeros(in_features))

    def forward(self, x):
        return F.normalize(x - self.center, dim=1) @ self.weight.t() + self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before the centring had none: centre 0, the plain L2 normalisation it used
        state_dict.setdefault(prefix + "center", torch.zeros_like(self.center))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def classify(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits in float32, outside any autocast region: under train.precision = bf16 the backbone
    runs in bf16, but cosine logits (scaled by s = 30 in the loss) and margins need float32."""
    with torch.autocast(features.device.type, enabled=False):
        return head(features.float())


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "linear_nobias":  # L-Softmax works on W_j . x exactly (Liu et al., ICML 2016)
        return nn.Linear(in_features, num_classes, bias=False)
    if kind == "cosine":
        return CosineLinear(in_features, num_classes)
    if kind == "ncm":
        return NormalizedLinear(in_features, num_classes)
    from ..errors import LongtailError

    raise LongtailError(f"unknown head {kind!r} asked for by the loss (valid: linear, linear_nobias, cosine, ncm)")
