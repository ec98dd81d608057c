"""Gated spatial convolution (GSC), the block in front of each encoder stage (docs/design.md §4)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_in_relu(channels: int, kernel_size: int) -> nn.Sequential:
    # ReLU in place: instance norm's backward needs its input, not its output.
    return nn.Sequential(nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2),
                         nn.InstanceNorm3d(channels), nn.ReLU(inplace=True))


class GSC(nn.Module):
    """x + ReLU(IN(Conv1x1(a + b))), a = two 3x3x3 conv-IN-ReLU, b = one 1x1x1 conv-IN-ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(_conv_in_relu(channels, 3), _conv_in_relu(channels, 3))
        self.pointwise = _conv_in_relu(channels, 1)
        self.gate = _conv_in_relu(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate(self.spatial(x) + self.pointwise(x))
