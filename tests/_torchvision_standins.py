"""Stand-ins for torchvision's ResNet-50 and ViT-B/16, for machines without torchvision.

torchvision cannot be installed beside the torch these tests run on, so the recipes'
torchvision code paths are tested against these modules: the same module tree (names,
classes, shapes) and the same forward computation as ``torchvision.models.resnet50``
and ``torchvision.models.vit_b_16``, written from the published architectures.
:func:`fake_torchvision` wraps them as a module that answers ``torchvision.models.resnet50``
and ``torchvision.models.vit_b_16``; the tests that use it say so. Weights are random.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5: the stride sits on the 3×3 conv)."""

    def __init__(self, inplanes: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks: conv1, bn1, relu, maxpool,
    layer1..layer4, avgpool, fc."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width)
            )
            stack = [Bottleneck(inplanes, width, stride, downsample)]
            inplanes = 4 * width
            stack += [Bottleneck(inplanes, width, 1, None) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stack))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        with torch.no_grad():  # non-trivial BatchNorm statistics and affines
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLPBlock(nn.Sequential):
    """torchvision's ViT MLP: Linear, GELU, Dropout, Linear, Dropout (``mlp.0``, ``mlp.3``)."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float):
        super().__init__(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )  # fmt: skip


class EncoderBlock(nn.Module):
    """torchvision's ViT ``EncoderBlock``: pre-norm ``nn.MultiheadAttention`` and MLP."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.ln_1 = norm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=0.0, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        layers = OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim))
            for i in range(num_layers)
        )
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision's ``VisionTransformer``: conv_proj, class_token, encoder, heads.head."""

    def __init__(
        self, image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
        mlp_dim=3072, num_classes=1000,
    ):  # fmt: skip
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        with torch.no_grad():  # random biases, so an ablated row is not simply zero
            for name, p in self.named_parameters():
                if name.endswith("bias") or name.endswith("in_proj_bias"):
                    p.normal_(0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def resnet50(*, weights=None, **kwargs) -> ResNet:
    assert weights is None, "the stand-in has no pretrained weights"
    return ResNet((3, 4, 6, 3), **kwargs)


def vit_b_16(*, weights=None, **kwargs) -> VisionTransformer:
    assert weights is None, "the stand-in has no pretrained weights"
    return VisionTransformer(**{"patch_size": 16, **kwargs})


def fake_torchvision() -> types.ModuleType:
    """A module standing in for ``torchvision`` (``.models.resnet50``, ``.models.vit_b_16``)."""
    module = types.ModuleType("torchvision")
    module.__version__ = "0.0-standin"
    module.models = types.SimpleNamespace(
        resnet50=resnet50, vit_b_16=vit_b_16, VisionTransformer=VisionTransformer
    )
    return module
