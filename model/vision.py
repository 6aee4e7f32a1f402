"""ConvNeXt vision tower (CLIP ConvNeXt-XXLarge layout) without timm.

Parameter names follow timm's ConvNeXt exactly (stem.0/1, stages.N.downsample.0/1,
stages.N.blocks.M.conv_dw/norm/mlp.fc1/mlp.fc2) except the block's layer-scale vector,
which the official checkpoints call `weight` (timm: `gamma`). So official keys load
with no renaming; only the unused classifier head is dropped (`UNUSED_KEY_PREFIXES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

# Keys a timm ConvNeXt file may carry that the tower does not use (the output is the
# raw last-stage map: no final norm, pooling or classifier).
UNUSED_KEY_PREFIXES = ("head.", "norm_pre.")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the CLIP ConvNeXt was trained
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    MLP_RATIO = 4
    KERNEL_SIZE = 7

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, self.KERNEL_SIZE, padding=self.KERNEL_SIZE // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, self.MLP_RATIO * dim)
        self.weight = nn.Parameter(torch.ones(dim))  # layer scale (timm: gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)) * self.weight
        return shortcut + x.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, downsample_stride: int | None):
        super().__init__()
        if downsample_stride is None:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=eps),
                nn.Conv2d(in_dim, dim, kernel_size=downsample_stride, stride=downsample_stride),
            )
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, eps) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """Returns the last stage as tokens: [N, 3, S, S] -> [N, (S/32)^2, dims[-1]]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        dims, eps = config.dims, config.norm_eps
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], kernel_size=config.stem_stride, stride=config.stem_stride),
            LayerNorm2d(dims[0], eps=eps),
        )
        self.stages = nn.Sequential(
            *(
                ConvNeXtStage(
                    in_dim=dims[max(i - 1, 0)],
                    dim=dims[i],
                    depth=config.depths[i],
                    eps=eps,
                    downsample_stride=None if i == 0 else config.downsample_stride,
                )
                for i in range(len(dims))
            )
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feature_map = self.stages(self.stem(pixels))
        return feature_map.flatten(2).transpose(1, 2)


class VisionTower(nn.Module):
    """Holder that reproduces the official nesting `vision_tower.vision_tower.*`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.vision_tower = ConvNeXt(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixels)
