"""Bilateral-branch ResNet-32 of BBN (Zhou et al., CVPR 2020; docs/methods.md §4): the `bbn_resnet32` entry point of
`longtail.models`.

The two branches share the whole ResNet-32 except the last residual block(s): a shared trunk
(conv1, BN, the first 15 - branch_blocks basic blocks) and, per branch, its own last
`branch_blocks` basic blocks and global average pool. The paper: "the two branches use the same
residual network structure and share all the weights except for the last residual block", so
branch_blocks defaults to 1; branch_blocks = 5 gives each branch its own whole last stage.

The classifier sees 2 [alpha f_c ; (1 - alpha) f_r] (128-d for ResNet-32), i.e.
logits = 2 alpha W_c f_c + 2 (1 - alpha) W_r f_r, the authors' combiner (the factor 2 keeps the
mixed feature at the scale of one branch's). `features(x)` / `forward(x)` use alpha = 0.5, the
test-time mix, which is the plain concatenation [f_c ; f_r] the authors evaluate with; training
(the `bbn` fine-tune strategy) calls `branch_features` per branch and `mix`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..errors import LongtailError
from .heads import classify, make_head
from .resnet import BasicBlock

BRANCHES = ("conventional", "rebalancing")


class BBNResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, head: str = "linear", branch_blocks: int = 1,
                 blocks_per_stage: int = 5, widths=(16, 32, 64)):
        super().__init__()
        plan, in_planes = [], widths[0]  # (in_planes, planes, stride) of every basic block, in order
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                plan.append((in_planes, w, 2 if (i > 0 and b == 0) else 1))
                in_planes = w
        if not 1 <= branch_blocks <= len(plan):
            raise LongtailError(f"model.branch_blocks must be between 1 and {len(plan)}, got {branch_blocks}")
        shared, own = plan[:-branch_blocks], plan[-branch_blocks:]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.trunk = nn.Sequential(*[BasicBlock(*b) for b in shared])
        self.conventional = nn.Sequential(*[BasicBlock(*b) for b in own])
        self.rebalancing = nn.Sequential(*[BasicBlock(*b) for b in own])
        self.branch_dim = in_planes
        self.feature_dim = 2 * in_planes
        for mod in self.modules():  # the backbone's convolutions, as the authors' `_weights_init`
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight)
        # the head keeps its own initialisation (a linear head: PyTorch's default), as the authors' nn.Linear
        self.classifier = make_head(head, self.feature_dim, num_classes)

    def shared(self, x):
        return self.trunk(F.relu(self.bn1(self.conv1(x))))

    def _pool(self, branch: nn.Module, h):
        return F.adaptive_avg_pool2d(branch(h), 1).flatten(1)

    def branch_features(self, x, branch: str):
        """The pooled feature of one branch ("conventional" or "rebalancing") for input x."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        return self._pool(getattr(self, branch), self.shared(x))

    @staticmethod
    def mix(f_c, f_r, alpha: float):
        """The classifier input 2 [alpha f_c ; (1 - alpha) f_r] (the authors' combiner)."""
        return 2 * torch.cat([alpha * f_c, (1 - alpha) * f_r], 1)

    def features(self, x, alpha: float = 0.5):
        """mix(f_c, f_r, alpha) for one input (the trunk runs once); alpha = 0.5 gives [f_c ; f_r]."""
        h = self.shared(x)
        return self.mix(self._pool(self.conventional, h), self._pool(self.rebalancing, h), alpha)

    def forward(self, x):
        return classify(self.classifier, self.features(x))


def build_bbn_resnet32(num_classes: int, in_channels: int = 3, head: str = "linear", *,
                       branch_blocks: int = 1) -> nn.Module:
    check_number("model.branch_blocks", branch_blocks, integer=True)
    return BBNResNet(num_classes, in_channels, head, branch_blocks)
