"""The paper's networks with its parameter counts (docs/reproducing.md), initialised as Keras does.

- ``fc``: Flatten → Linear(·, 128) → ReLU → Linear(128, 10): 101,770 parameters on 28×28×1,
  394,634 on 32×32×3.
- ``cnn``: Conv(32, 3×3) → ReLU → MaxPool2 → Conv(64, 3×3) → ReLU → MaxPool2 → Conv(64, 3×3) →
  ReLU → Flatten → Linear(·, 64) → ReLU → Linear(64, 10): 93,322 / 122,570.
- ``resnet8``: Keras-style ResNet v1 with one basic block per stage (16/32/64 filters, 3×3 convs
  without bias followed by BatchNorm, 1×1 projection shortcuts without bias or BN where the stage
  downsamples), global average pooling, Linear(64, 10). 77,850 trainable parameters; with
  BatchNorm's running mean and variance (which Keras counts as weights) 78,330, the paper's D.

Keras defaults: Glorot-uniform kernels, zero biases. The softmax is left to the loss
(``cross_entropy`` on the logits equals Keras's softmax + categorical cross-entropy).
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("fc", "cnn", "resnet8")


def keras_init(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def fc(input_shape: tuple[int, int, int], num_classes: int = 10) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(), nn.Linear(128, num_classes))


def cnn(input_shape: tuple[int, int, int], num_classes: int = 10) -> nn.Module:
    c, h, w = input_shape
    side_h, side_w = ((h - 2) // 2 - 2) // 2 - 2, ((w - 2) // 2 - 2) // 2 - 2
    return nn.Sequential(
        nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
        # Keras flattens channels-last; the order only permutes the next layer's rows.
        nn.Flatten(), nn.Linear(64 * side_h * side_w, 64), nn.ReLU(), nn.Linear(64, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, filters: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, filters, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters)
        self.conv2 = nn.Conv2d(filters, filters, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters)
        self.shortcut = (nn.Conv2d(inputs, filters, 1, stride, bias=False)
                         if stride != 1 or inputs != filters else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet8(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


BUILDERS = {"fc": fc, "cnn": cnn, "resnet8": ResNet8}


def build(name: str, input_shape: tuple[int, int, int], num_classes: int = 10, *, seed: int = 0) -> nn.Module:
    """A freshly initialised network; the same seed gives the same initial weights."""
    if name not in BUILDERS:
        raise ValueError(f"rbd_cuda: model must be one of {MODELS}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return keras_init(BUILDERS[name](tuple(input_shape), num_classes))


def count_parameters(model: nn.Module, *, keras: bool = False) -> int:
    """Trainable parameters; ``keras=True`` adds BatchNorm's running statistics as Keras does."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if keras:
        total += sum(m.running_mean.numel() + m.running_var.numel()
                     for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return total
