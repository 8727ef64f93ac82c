"""Classifiers for tabular and small image data (the digits demo).

Sizes are checked against ``zoo.limits`` before any layer is allocated.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from zoo import limits


def mlp(*, inputs: int, classes: int, hidden: list[int] | None = None, dropout: float = 0.0) -> nn.Module:
    """An MLP: inputs → hidden… → classes (logits).  Inputs of any shape are flattened."""
    widths = [limits.size("inputs", inputs)]
    hidden = [128, 64] if hidden is None else hidden
    if not isinstance(hidden, list) or len(hidden) > limits.MAX_LAYERS:
        raise ValueError(f"hidden must be a list of at most {limits.MAX_LAYERS} widths")
    widths += [limits.size(f"hidden[{i}]", h) for i, h in enumerate(hidden)]
    widths.append(limits.size("classes", classes))
    dropout = limits.fraction("dropout", dropout)
    limits.parameters("this MLP", sum(a * b + b for a, b in itertools.pairwise(widths)))
    layers: list[nn.Module] = [nn.Flatten()]
    for width, h in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv layers for small square grey images (e.g. 8×8 digits given as 64 features)."""

    def __init__(self, side: int, classes: int, channels: int = 16) -> None:
        super().__init__()
        self.side = limits.size("side", side, high=1 << 16)
        c, k = limits.size("channels", channels), limits.size("classes", classes)
        limits.parameters("this CNN", (9 * c + c) + (9 * c * 2 * c + 2 * c) + (2 * c * 4 * k + k))
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c * 2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(c * 2 * 4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def cnn(*, side: int, classes: int, channels: int = 16) -> nn.Module:
    return SmallCNN(side, classes, channels)
