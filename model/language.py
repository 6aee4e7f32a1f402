"""Qwen2 decoder with the Slow-Fast hybrid layers (spec section 7).

Plain layers are transformers' `Qwen2DecoderLayer` whose attention can run a kernel made
for decode steps (`decode_attention.py`). A hybrid layer is the same layer whose attention
adds a gated text-to-slow-token cross term before `o_proj`. RMSNorm, rotary embedding, MLP,
the other calls' attention kernels and KV caches all come from transformers; this module
only adds the cross term and the decode kernels' hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import importlib.util
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)

from .config import SlowFastConfig
from .decode_attention import DecodeAttention

# Token types of the hybrid layers.
PROMPT_TEXT, RESPONSE_TEXT, FAST_VISUAL, PADDING = 1, 2, 3, 4

# transformers 5.x renamed the decoder layer's cache argument from `past_key_values` to
# `cache` (the old name still works with a deprecation warning): pass whichever this
# version's layer takes, so the cache is never silently dropped into **kwargs.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2DecoderLayer.forward).parameters else "past_key_values"

FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def cross_attention_token_mask(
    token_types: torch.Tensor, has_visual: torch.Tensor, decode_cross_attention: bool
) -> torch.Tensor:
    """Which tokens receive the cross term, [B, L] bool.

    Prompt text always does (when the sample has visual input). Generated tokens do only
    with `decode_cross_attention`: the official cached decode step carries no visual
    token, so its rule switches the cross term off there (a quirk of the released model, kept).
    """
    mask = token_types == PROMPT_TEXT
    if decode_cross_attention:
        mask |= token_types == RESPONSE_TEXT
    return mask & has_visual[:, None]


@dataclass
class SlowTokenContext:
    """Slow tokens of a batch and their per-layer keys/values, computed once per call.

    `kv` is filled by the prefill (hybrid layer index -> keys, values [B, Hkv, S, D]);
    decode steps that apply the cross term reuse it, so `states` may then be None.
    """

    states: torch.Tensor | None  # [B, S, hidden] projected, pooled per-frame features
    valid: torch.Tensor  # [B, S] bool: False for padding of shorter samples
    token_mask: torch.Tensor | None = None  # [B, L] bool for the current input tokens
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def keys_values(self, layer_idx: int, build: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
        if layer_idx not in self.kv:
            self.kv[layer_idx] = build()
        return self.kv[layer_idx]


def _flash_varlen_usable(query: torch.Tensor) -> bool:
    # The varlen kernel needs the packed lengths on the host: not inside a compiled step.
    return (
        FLASH_ATTN_INSTALLED
        and query.device.type == "cuda"
        and query.dtype in (torch.float16, torch.bfloat16)
        and not torch.compiler.is_compiling()
    )


def cross_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, num_kv_groups: int
) -> torch.Tensor:
    """Non-causal attention of queries [B, Hq, L, D] over slow keys/values [B, Hkv, S, D].

    Returns [B, L, Hq * D]. On CUDA with flash-attn installed, padded slow tokens are
    removed and flash-attn's varlen kernel runs on the packed sequences; otherwise SDPA
    with a key-padding mask.
    """
    batch, heads, length, head_dim = query.shape
    if _flash_varlen_usable(query):
        from flash_attn import flash_attn_varlen_func

        keep = valid.flatten().nonzero().squeeze(1)
        seqlens_k = valid.sum(1, dtype=torch.int32)
        cu_k = F.pad(seqlens_k.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        packed_k = key.transpose(1, 2).reshape(-1, key.shape[1], head_dim)[keep]
        packed_v = value.transpose(1, 2).reshape(-1, value.shape[1], head_dim)[keep]
        out = flash_attn_varlen_func(
            query.transpose(1, 2).reshape(batch * length, heads, head_dim),
            packed_k,
            packed_v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=length,
            max_seqlen_k=int(seqlens_k.max()),
            causal=False,
        )
        return out.reshape(batch, length, heads * head_dim)
    # A sample without slow tokens would give an all-masked row (NaN); its cross term is
    # gated off by the token mask anyway, so let it attend to slot 0. Written without
    # indexing so it needs no host sync.
    first_slot = torch.arange(valid.shape[1], device=valid.device) == 0
    safe_valid = valid | (~valid.any(1, keepdim=True) & first_slot)
    out = F.scaled_dot_product_attention(
        query,
        repeat_kv(key, num_kv_groups),
        repeat_kv(value, num_kv_groups),
        attn_mask=safe_valid[:, None, None, :],
    )
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


class DecoderAttention(Qwen2Attention):
    """Qwen2 self-attention whose decode steps attend through a `DecodeAttention` (a kernel
    made for one query over a KV cache); other calls use transformers' attention functions."""

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        decode_attention: DecodeAttention | None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output [B, L, Hq * D] before `o_proj`, and the rotated queries [B, Hq, L, D]."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if decode_attention is not None:
            attn_output = decode_attention.self_attention(query, key, value, self.scaling).transpose(1, 2)
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            attn_output, _ = attention_interface(
                self, query, key, value, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                sliding_window=self.sliding_window, **kwargs,
            )
        return attn_output.reshape(*input_shape, -1), query

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        decode_attention: DecodeAttention | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        attn_output, _ = self.attend(hidden_states, position_embeddings, attention_mask, cache, decode_attention, **kwargs)
        return self.o_proj(attn_output), None


class HybridAttention(DecoderAttention):
    """Qwen2 self-attention plus the gated text-to-slow-token cross term."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        kv_width = config.num_key_value_heads * self.head_dim
        self.cross_attn_kv_proj = nn.Linear(config.hidden_size, 2 * kv_width, bias=True)
        self.cross_attn_gate_proj = nn.Sequential(nn.Linear(config.hidden_size, 1), nn.Tanh())
        self.cross_attn_warm_up_gate = nn.Parameter(torch.zeros(1))

    def slow_keys_values(self, normed_slow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, hidden] -> keys, values [B, Hkv, S, D]; features are head-major (k_j, v_j)."""
        batch, length, _ = normed_slow.shape
        kv = self.cross_attn_kv_proj(normed_slow).view(batch, length, -1, 2, self.head_dim)
        return kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        slow_context: SlowTokenContext | None = None,
        slow_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        decode_attention: DecodeAttention | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        attn_output, query = self.attend(hidden_states, position_embeddings, attention_mask, cache, decode_attention, **kwargs)

        token_mask = slow_context.token_mask if slow_context is not None else None
        # No host sync here: tokens outside the mask get the term multiplied by zero, and a
        # step that applies it to no token passes token_mask=None to skip the work.
        if slow_kv is not None and token_mask is not None:
            if decode_attention is not None:
                context = decode_attention.cross_attention(query, *slow_kv, slow_context.valid)
                context = context.transpose(1, 2).reshape(*attn_output.shape[:-1], -1)
            else:
                context = cross_attention(query, *slow_kv, slow_context.valid, self.num_key_value_groups)
            gate = self.cross_attn_gate_proj(attn_output) * torch.tanh(self.cross_attn_warm_up_gate)
            attn_output = attn_output + token_mask[..., None].to(attn_output.dtype) * gate * context.to(attn_output.dtype)
        return self.o_proj(attn_output), None


class PlainDecoderLayer(Qwen2DecoderLayer):
    """Qwen2DecoderLayer whose attention can run a decode kernel (`DecoderAttention`)."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = DecoderAttention(config, layer_idx)


class HybridDecoderLayer(Qwen2DecoderLayer):
    """Qwen2DecoderLayer whose attention cross-attends to the slow tokens.

    The slow tokens are normalised with this layer's own input RMSNorm before the K/V
    projection; those keys/values are computed once per call and reused by decode steps.
    """

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = HybridAttention(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, slow_context: SlowTokenContext | None = None, **kwargs):
        slow_kv = None
        if slow_context is not None and slow_context.valid.shape[1] > 0:  # a text-only batch has none
            slow_kv = slow_context.keys_values(
                self.self_attn.layer_idx,
                lambda: self.self_attn.slow_keys_values(self.input_layernorm(slow_context.states)),
            )
        return super().forward(hidden_states, slow_context=slow_context, slow_kv=slow_kv, **kwargs)


class SlowFastDecoder(nn.Module):
    """Embeddings, decoder layers and final norm. Names match the checkpoints' `model.*`."""

    def __init__(self, config: SlowFastConfig, text_config: Qwen2Config):
        super().__init__()
        self.text_config = text_config
        hybrid = set(config.hybrid_layer_ids)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HybridDecoderLayer(text_config, i) if i in hybrid else PlainDecoderLayer(text_config, i)
            for i in range(config.num_hidden_layers)
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=text_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        slow_context: SlowTokenContext | None = None,
        decode_attention: DecodeAttention | None = None,
    ) -> torch.Tensor:
        """`decode_attention`: set by decode steps (one query per row over the static cache)."""
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            extra = {"slow_context": slow_context} if isinstance(layer, HybridDecoderLayer) else {}
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                decode_attention=decode_attention,
                **{CACHE_ARGUMENT: cache},
                **extra,
            )
        return self.norm(hidden_states)
