"""The whole network as one nn.Module whose state-dict names are the official ones."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .config import SlowFastConfig
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

    def project_frames(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Vision tower + projector per frame: [T, 3, S, S] -> [T, grid^2, hidden]."""
        chunks = [
            self.model.mm_projector(self.model.vision_tower(chunk))
            for chunk in pixels.split(batch_size)
        ]
        return torch.cat(chunks)

    def encode_video_frames(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-frame pooled features of video frames: [T, 3, S, S] -> [T, tokens_per_frame, hidden]."""
        return pool_frames(self.project_frames(pixels, batch_size), self.config.mm_video_pooling_stride)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        slow_context: SlowTokenContext | None = None,
        logits_positions: slice | None = None,
    ) -> torch.Tensor:
        """Logits [B, L', vocab] for the positions in `logits_positions` (all by default)."""
        hidden = self.model(inputs_embeds, position_ids, attention_mask, cache=cache, slow_context=slow_context)
        if logits_positions is not None:
            hidden = hidden[:, logits_positions]
        return self.lm_head(hidden)
