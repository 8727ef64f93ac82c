"""Classifiers for tabular and small image data (the digits demo)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(*, inputs: int, classes: int, hidden: list[int] | None = None, dropout: float = 0.0) -> nn.Module:
    """An MLP: inputs → hidden… → classes (logits).  Inputs of any shape are flattened."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for h in hidden if hidden is not None else [128, 64]:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv layers for small square grey images (e.g. 8×8 digits given as 64 features)."""

    def __init__(self, side: int, classes: int, channels: int = 16) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(channels * 2 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def cnn(*, side: int, classes: int, channels: int = 16) -> nn.Module:
    return SmallCNN(side, classes, channels)
