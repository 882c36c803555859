"""A small CNN with the layer patterns fold-bn handles: Conv→BN (with and without bias, grouped,
depthwise), ConvTranspose→BN, BN→Flatten→Linear, Linear→BatchNorm1d — and one BN it must leave
(after a ReLU, feeding a padded conv).

    normrewrite convert examples/tiny_cnn.py:build -o out.onnx -o out.pt2
"""

import torch
from torch import nn


def _trained_looking_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics measured on data (as training leaves them) and non-trivial γ/β.

    Default BN (mean 0, var 1, γ 1, β 0) makes folding nearly an identity and hides bugs; random
    statistics that do not match the activations make the output a constant. Measure them."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            m.momentum = None  # cumulative average over the calibration batches
            m.reset_running_stats()
        model.train()
        for _ in range(8):
            model(torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32))
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2, groups=2), nn.BatchNorm2d(16), nn.ReLU())
        self.post_relu_bn = nn.BatchNorm2d(16)  # after a ReLU, before a padded conv: must stay
        self.mix = nn.Conv2d(16, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head_bn = nn.BatchNorm2d(8)  # BN2d -> Flatten -> Linear: folds into the Linear
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.fc_bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.depthwise(self.grouped(self.stem(x))))
        x = self.pool(self.mix(self.post_relu_bn(x)))
        x = self.fc_bn(self.fc(self.flatten(self.head_bn(x))))
        return self.out(torch.relu(x))


def build() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = _trained_looking_bn(TinyCNN())
    return model, (torch.randn(4, 3, 32, 32),)
