"""Models for the collection benchmarks, in plain torch (no torchvision, no timm).

The digits CNN is not here: benchmarks use ``coarpy.demo.small_digits_cnn``, the model
of the test suite, and ``coarpy.demo.DigitsCNN``, the demo's.

- ``cifar_resnet``: a ResNet-18-shaped CIFAR network (4 stages of 2 basic blocks) at
  half width, 2,400 conv filters, written as an ``nn.Sequential`` of stages so that a
  prefix split applies.
- ``vit``: a ViT with the shapes of ViT-B/16 by default (12 blocks, width 768, 12 heads,
  MLP 3072, 16x16 patches); heads and MLP neurons are discoverable
  (``Attention.num_heads`` + ``Attention.proj``; ``Mlp.fc2``).

Weights are random (seeded): the benchmarks measure speed, not accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def cifar_resnet(width: int = 32, n_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """ResNet-18 layout for 32x32 inputs; ``width=32`` gives 2,400 conv filters.

    Children: ``0`` stem (conv, bn, relu), ``1``..``4`` the stages, ``5`` the head.
    """
    torch.manual_seed(seed)
    widths = [width, 2 * width, 4 * width, 8 * width]
    stages = []
    c_in = width
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(BasicBlock(c_in, w, stride), BasicBlock(w, w, 1)))
        c_in = w
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
        *stages,
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)),
    )
    # Non-trivial BatchNorm statistics, as in a trained network.
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


class Attention(nn.Module):
    """Multi-head self-attention with a separate output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, h, t, hd)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, image: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (b, n, dim)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos


class Head(nn.Module):
    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x[:, 0]))


def vit(
    *,
    image: int = 224,
    patch: int = 16,
    dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp: int = 3072,
    n_classes: int = 1000,
    seed: int = 0,
) -> nn.Sequential:
    """A ViT (ViT-B/16 shapes by default) as ``Sequential(embed, *blocks, head)``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        PatchEmbed(image, patch, dim),
        *[Block(dim, num_heads, mlp) for _ in range(depth)],
        Head(dim, n_classes),
    ).eval()
