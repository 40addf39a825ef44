"""ResNet-32 for 32x32 inputs (He et al., CVPR 2016, §4.2): 3 stages x 5 basic blocks, widths
16/32/64, option-A shortcuts (stride-2 subsampling + zero-padded channels), global average pool,
Kaiming-normal init; ~0.46 M parameters for 10 classes. Works on any input size (e.g. 8x8 digits)."""

import torch.nn.functional as F
from torch import nn

from .heads import classify, make_head


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.subsample = stride != 1 or in_planes != planes
        self.extra = planes - in_planes

    def shortcut(self, x):
        if not self.subsample:
            return x
        # option A: take every other pixel, pad the new channels with zeros (no parameters)
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, head: str = "linear",
                 blocks_per_stage: int = 5, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, w, 2 if (i > 0 and b == 0) else 1))
                in_planes = w
        self.layers = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.classifier = make_head(head, in_planes, num_classes)
        for mod in self.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return classify(self.classifier, self.features(x))


def build_resnet32(num_classes: int, in_channels: int = 3, head: str = "linear", **params) -> nn.Module:
    """The `resnet32` entry point of `longtail.models`."""
    if params:
        from ..errors import LongtailError

        raise LongtailError(f"model.{next(iter(params))}: resnet32 takes no parameters besides model.arch")
    return CifarResNet(num_classes, in_channels, head)
