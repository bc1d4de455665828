"""CIFAR ResNets, defined here so the examples and benchmarks need no torchvision.

* :func:`resnet20` -- the CIFAR ResNet-20 of He et al. 2016 ("Deep Residual Learning for Image
  Recognition", section 4.2): a 3x3 conv stem with 16 channels, then 3 stages of 3 BasicBlocks with
  16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2), global average pooling and one
  Linear layer; 6n + 2 = 20 weighted layers for n = 3, 0.27M parameters.
  Shortcuts are **option A** of the paper: when a block halves the resolution and doubles the channels
  the identity is subsampled (stride 2) and zero-padded with the missing channels -- no parameters.
  This is the configuration the paper's 0.27M count and CIFAR table refer to, and it leaves every
  weighted layer a 3x3 conv (or the classifier), which is what the compression benchmarks quantize.
* :func:`resnet18` -- the usual CIFAR adaptation of ResNet-18 (as in kuangliu/pytorch-cifar): a 3x3,
  stride-1 stem with 64 channels and no max-pool (32x32 inputs are too small for ImageNet's 7x7/2 stem
  and pool), 4 stages of 2 BasicBlocks with 64 / 128 / 256 / 512 channels, 1x1-conv + BatchNorm
  (option B) shortcuts where the shape changes; 11.2M parameters.

Both use Kaiming-normal (fan-out, ReLU gain) initialisation for convs, as torchvision's ResNets do,
BatchNorm weight 1 / bias 0, and PyTorch's default init for the final Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet20"]


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels from ``c_in`` to ``c_out``."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        if c_out < c_in or (c_out - c_in) % 2:
            raise ValueError(f"option-A shortcut needs c_out >= c_in and an even difference, got {c_in}->{c_out}")
        self.stride = stride
        self.pad = (c_out - c_in) // 2  # split evenly in front and behind, as in the reference code

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(c_in, c_out, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 images: 3x3 stem (no max-pool), BasicBlock stages, global pool, Linear.

    Args:
        widths: channels of each stage; the stem has ``widths[0]`` channels.
        depths: BasicBlocks per stage; every stage after the first starts with a stride-2 block.
        num_classes: outputs of the classifier.
        shortcut: ``"A"`` (parameter-free zero-padding) or ``"B"`` (1x1 conv + BN) where shapes change.
        in_channels: input image channels.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        num_classes: int = 10,
        shortcut: str = "B",
        in_channels: int = 3,
    ):
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths and depths must be non-empty and of equal length, got {widths}, {depths}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c_in = widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, w, stride, shortcut))
                c_in = w
            stages.append(nn.Sequential(*blocks))
        # layer1, layer2, ... as in torchvision, so include/exclude patterns read the same
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 3 x 3 BasicBlocks, 16/32/64 channels, option-A shortcuts."""
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes, shortcut="A")


def resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, 4 x 2 BasicBlocks, 64..512 channels, 1x1 shortcuts."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, shortcut="B")
