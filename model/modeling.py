"""The whole network as one nn.Module whose state-dict names are the official ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache

from .config import SlowFastConfig
from .decode_attention import DecodeAttention
from .language import SlowFastDecoder, SlowTokenContext
from .vision import VisionTower
from .visual_tokens import build_projector, pool_frames


class SlowFastBackbone(SlowFastDecoder):
    """`model.*`: the decoder plus `vision_tower.vision_tower.*` and `mm_projector.*`."""

    def __init__(self, config: SlowFastConfig, attn_implementation: str):
        super().__init__(config, config.text_config(attn_implementation))
        self.vision_tower = VisionTower(config.vision_config)
        self.mm_projector = build_projector(config)


class SlowFastForCausalLM(nn.Module):
    def __init__(self, config: SlowFastConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = SlowFastBackbone(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def attn_implementation(self) -> str:
        return self.model.text_config._attn_implementation

    def project_frames(self, pixels: torch.Tensor, batch_size: int, tower: Callable | None = None) -> torch.Tensor:
        """Vision tower + projector per frame: [T, 3, S, S] -> [T, grid^2, hidden].

        `tower` replaces the plain tower (e.g. a compiled one); each chunk then has exactly
        `batch_size` frames, the last one zero-padded, so a compiled tower meets one shape.
        """
        run = tower if tower is not None else self.model.vision_tower
        pad_chunks = tower is not None
        if pixels.device.type == "cuda":
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        chunks = []
        for chunk in pixels.split(batch_size):
            count = chunk.shape[0]
            if pad_chunks and count < batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(batch_size - count, *chunk.shape[1:])])
            chunks.append(self.model.mm_projector(run(chunk)[:count]))
        return torch.cat(chunks)

    def encode_video_frames(self, pixels: torch.Tensor, batch_size: int, tower: Callable | None = None) -> torch.Tensor:
        """Per-frame pooled features of video frames: [T, 3, S, S] -> [T, tokens_per_frame, hidden]."""
        return pool_frames(self.project_frames(pixels, batch_size, tower), self.config.mm_video_pooling_stride)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        slow_context: SlowTokenContext | None = None,
        logits_positions: slice | tuple[torch.Tensor, torch.Tensor] | None = None,
        decode_attention: DecodeAttention | None = None,
    ) -> torch.Tensor:
        """Logits [B, L', vocab] for the positions in `logits_positions` (all by default), or
        [N, vocab] for N (row, position) pairs given as two index tensors."""
        hidden = self.model(inputs_embeds, position_ids, attention_mask, cache=cache, slow_context=slow_context,
                            decode_attention=decode_attention)
        if isinstance(logits_positions, tuple):
            hidden = hidden[logits_positions]
        elif logits_positions is not None:
            hidden = hidden[:, logits_positions]
        return self.lm_head(hidden)
