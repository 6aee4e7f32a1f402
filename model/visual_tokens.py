"""From projected vision features to the LLM's slow and fast visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SlowFastConfig, isqrt_exact


def build_projector(config: SlowFastConfig) -> nn.Sequential:
    """mlp2x_gelu: names `mm_projector.0` and `mm_projector.2` as in the checkpoints."""
    return nn.Sequential(
        nn.Linear(config.mm_hidden_size, config.hidden_size),
        nn.GELU(),
        nn.Linear(config.hidden_size, config.hidden_size),
    )


def _to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[T, n, C] -> [T, C, side, side]"""
    frames, count, channels = tokens.shape
    side = isqrt_exact(count, "visual token grid")
    return tokens.reshape(frames, side, side, channels).permute(0, 3, 1, 2)


def _from_grid(grid: torch.Tensor) -> torch.Tensor:
    """[T, C, h, w] -> [T, h*w, C]"""
    return grid.flatten(2).transpose(1, 2)


def pool_frames(projected: torch.Tensor, stride: int) -> torch.Tensor:
    """Per-frame spatial average pooling of video frames: [T, 324, C] -> [T, 81, C].

    Depends on each frame alone, which is what lets streaming cache it per frame.
    """
    if stride == 1:
        return projected
    return _from_grid(F.avg_pool2d(_to_grid(projected), kernel_size=stride, stride=stride))


def fast_frame_indices(total: int, sampling_stride: int, min_frames: int) -> list[int]:
    """Temporal sampling of step 1: n = max(T // s, min) frames at floor(i * T / n)."""
    if sampling_stride <= 1 or total < min_frames:
        return list(range(total))
    count = max(total // sampling_stride, min_frames)
    return [min(int(i * total / count), total - 1) for i in range(count)]


def fast_tokens(pooled: torch.Tensor, config: SlowFastConfig) -> torch.Tensor:
    """Fast tokens of a video from its per-frame pooled features [T, n, C] -> [N_fast, C]."""
    indices = fast_frame_indices(pooled.shape[0], config.fast_token_temporal_sampling_stride, config.min_fast)
    grid = _to_grid(pooled[indices])  # [T', C, h, w]

    stride = config.fast_token_temporal_stride
    if stride > 1:
        frames = grid.shape[0]
        by_time = grid.transpose(0, 1)  # [C, T', h, w]: pool3d treats C as the batch
        if frames // stride >= config.min_fast:
            # Non-overlapping means over k frames, dropping the T' mod k tail (avg_pool3d with
            # kernel (k, 1, 1), which has no bf16 kernel on CPU); accumulated in float32 as
            # CUDA's avg_pool3d does for half types.
            groups = frames // stride
            grouped = by_time[:, : groups * stride].unflatten(1, (groups, stride))
            by_time = grouped.mean(2, dtype=torch.float32).to(by_time.dtype)
        else:
            by_time = F.adaptive_avg_pool3d(by_time, (min(frames, config.min_fast), *grid.shape[-2:]))
        grid = by_time.transpose(0, 1)

    if config.fast_token_spatial_stride > 1:
        grid = F.avg_pool2d(grid, kernel_size=config.fast_token_spatial_stride, stride=config.fast_token_spatial_stride)
    return _from_grid(grid).flatten(0, 1)


def image_fast_tokens(projected: torch.Tensor, config: SlowFastConfig) -> torch.Tensor:
    """A single image: only the spatial fast-token pooling, on its unpooled grid."""
    grid = _to_grid(projected)
    if config.fast_token_spatial_stride > 1:
        grid = F.avg_pool2d(grid, kernel_size=config.fast_token_spatial_stride, stride=config.fast_token_spatial_stride)
    return _from_grid(grid).flatten(0, 1)


@dataclass(frozen=True)
class VisualTokens:
    """One sample's visual input to the LLM."""

    fast: torch.Tensor  # [N_fast, hidden]: spliced into the sequence at <image>
    slow: torch.Tensor  # [N_slow, hidden]: attended by the hybrid layers' cross-attention


def video_tokens(pooled: torch.Tensor, config: SlowFastConfig) -> VisualTokens:
    """Per-frame pooled features [T, n, C] of a video (T >= 1) -> slow and fast tokens."""
    return VisualTokens(fast=fast_tokens(pooled, config), slow=pooled.flatten(0, 1))


def image_tokens(projected: torch.Tensor, config: SlowFastConfig) -> VisualTokens:
    """Unpooled projected features [1, N, C] of one image -> slow and fast tokens."""
    return VisualTokens(fast=image_fast_tokens(projected, config), slow=projected.flatten(0, 1))
