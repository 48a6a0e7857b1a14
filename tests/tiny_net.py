"""A tiny hand-checkable network shared by the criteria tests."""

import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    """stem (pinned) -> a + bn_a + relu -> b + bn_b + relu -> pool -> fc (pinned), all 1x1 convs: groups ``a``
    (a's filters, bn_a and b's input slices; read by ``b``) and ``b`` (read by ``fc``)."""

    def __init__(self, width: int = 4, inputs: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(inputs, 2, 1, bias=False)
        self.a = nn.Conv2d(2, width, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, 3, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(self.stem(x))))
        x = F.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean((2, 3)))
