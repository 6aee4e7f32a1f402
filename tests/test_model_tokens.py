"""Slow and fast visual tokens: counts at the released strides and the edge cases."""

from __future__ import annotations

import pytest
import torch

from model import SlowFastConfig, VideoQuery
from model.random_checkpoint import RANDOM_CHECKPOINT_CONFIG
from model.visual_tokens import fast_frame_indices, fast_tokens, video_tokens
from tests.support.random_model import random_frames

TOKENS_PER_FRAME = 81


def config_with(**overrides) -> SlowFastConfig:
    return SlowFastConfig.from_source(RANDOM_CHECKPOINT_CONFIG | {"vocab_size": 512} | overrides)


def pooled_features(frames: int, hidden: int = 8) -> torch.Tensor:
    """Per-frame features whose value encodes the frame index, so pooling is checkable."""
    index = torch.arange(frames, dtype=torch.float32)[:, None, None]
    return index + torch.randn(frames, TOKENS_PER_FRAME, hidden) * 0.01


def test_64_frames_give_released_token_counts(tiny_vlm):
    tokens = tiny_vlm.visual_tokens(VideoQuery(frames=random_frames(64), question="q"))
    assert tokens.fast.shape == (1296, tiny_vlm.config.hidden_size)
    assert tokens.slow.shape == (5184, tiny_vlm.config.hidden_size)


def test_96_frames_with_temporal_stride_6_give_16_frames_of_fast_tokens():
    config = config_with(fast_token_temporal_stride=6)
    tokens = video_tokens(pooled_features(96), config)
    assert tokens.fast.shape[0] == 16 * TOKENS_PER_FRAME
    assert tokens.slow.shape[0] == 96 * TOKENS_PER_FRAME


def test_group_pooling_averages_consecutive_frames_and_drops_the_tail():
    config = config_with()  # k = 4, min_fast_frames = 16
    features = pooled_features(66)  # 66 // 4 = 16 groups, 2 trailing frames dropped
    fast = fast_tokens(features, config).view(16, TOKENS_PER_FRAME, -1)
    expected = features[:64].view(16, 4, TOKENS_PER_FRAME, -1).mean(1)
    torch.testing.assert_close(fast, expected)


def test_fewer_groups_than_min_fast_frames_uses_adaptive_pooling():
    config = config_with()  # 40 // 4 = 10 < 16 -> adaptive pooling to 16 frames
    features = pooled_features(40)
    fast = fast_tokens(features, config).view(16, TOKENS_PER_FRAME, -1)
    for i in range(16):  # torch's adaptive windows: [floor(i*T/n), ceil((i+1)*T/n))
        start, end = (i * 40) // 16, -(-((i + 1) * 40) // 16)
        torch.testing.assert_close(fast[i], features[start:end].mean(0))


def test_fewer_frames_than_min_fast_frames_keeps_every_frame():
    config = config_with()
    features = pooled_features(10)
    fast = fast_tokens(features, config)
    torch.testing.assert_close(fast, features.flatten(0, 1))


def test_temporal_sampling_stride_picks_floor_indices():
    assert fast_frame_indices(64, 2, 16) == list(range(0, 64, 2))
    assert fast_frame_indices(20, 2, 16) == [int(i * 20 / 16) for i in range(16)]
    assert fast_frame_indices(10, 2, 16) == list(range(10))  # fewer than min: all frames
    config = config_with(fast_token_temporal_sampling_stride=2, fast_token_temporal_stride=1)
    features = pooled_features(64)
    fast = fast_tokens(features, config).view(32, TOKENS_PER_FRAME, -1)
    torch.testing.assert_close(fast, features[::2])


def test_spatial_stride_pools_the_pooled_grid():
    config = config_with(fast_token_spatial_stride=3)  # 9x9 -> 3x3
    tokens = video_tokens(pooled_features(64), config)
    assert tokens.fast.shape[0] == 16 * 9


def test_single_image_is_not_pooled(tiny_vlm):
    tokens = tiny_vlm.visual_tokens(VideoQuery(frames=random_frames(1), question="q"))
    grid = tiny_vlm.config.vision_config.grid_size
    assert tokens.fast.shape[0] == grid * grid == 324
    assert tokens.slow.shape[0] == 324


def test_spatial_stride_that_does_not_divide_the_grid_is_rejected():
    from model import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match="fast_token_spatial_stride=2"):
        config_with(fast_token_spatial_stride=2)  # 9 is odd
