"""Attention of a decode step: one query per row over the static KV cache.

Backends (the `decode_attention` setting):
- "sdpa": torch's scaled_dot_product_attention with a key-padding mask over every slot of
  the cache. The query heads that share a key/value head are passed as that head's queries,
  so the cache is read as is: repeating the key/value heads per query head (what a masked,
  compiled SDPA call otherwise does) would copy the whole cache in every layer and step.
- "flex": FlexAttention. Its block mask skips the cache blocks before a row's first prompt
  token and after the current slot; fused kernels only when compiled (eager it is a slow
  reference implementation).
- "flash": flash-attn's `flash_attn_with_kvcache` (CUDA, float16/bfloat16, flash-attn >= 2.6
  for `cache_leftpad`). It attends to the slots [start, end) of each row, so the prefill
  leaves every row's valid slots contiguous, ending where decoding starts.
- "auto": flash when it can run, else flex when the step is compiled on CUDA, else sdpa.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .errors import UnsupportedConfigError

DecodeAttentionChoice = Literal["auto", "sdpa", "flex", "flash"]
DECODE_ATTENTION_CHOICES: tuple[str, ...] = ("auto", "sdpa", "flex", "flash")

# FlexAttention's key/value block. Decode caches are a multiple of it (slots come in blocks of 256).
FLEX_BLOCK = 128


def _flash_kvcache_supports_leftpad() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:  # installed but built for another torch or CUDA
        return False
    return "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters


FLASH_KVCACHE_USABLE = _flash_kvcache_supports_leftpad()


def flash_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    return FLASH_KVCACHE_USABLE and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def backends_on(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The backends that run on this device and dtype (flex everywhere torch runs it)."""
    return ["sdpa", "flex"] + (["flash"] if flash_runs_on(device, dtype) else [])


def resolve_decode_attention(choice: str, device: torch.device, dtype: torch.dtype, compiled: bool) -> str:
    """The backend `choice` names on this device; UnsupportedConfigError for one that cannot run."""
    if choice not in DECODE_ATTENTION_CHOICES:
        raise UnsupportedConfigError(f"decode_attention={choice!r} is not one of {', '.join(DECODE_ATTENTION_CHOICES)}")
    if choice == "flash" and not flash_runs_on(device, dtype):
        raise UnsupportedConfigError(
            f"decode_attention='flash' needs flash-attn >= 2.6 installed, a CUDA device and float16 or bfloat16 "
            f"(here: {'flash-attn usable' if FLASH_KVCACHE_USABLE else 'no usable flash-attn'}, {device.type}, "
            f"{str(dtype).removeprefix('torch.')})"
        )
    if choice != "auto":
        return choice
    if flash_runs_on(device, dtype):
        return "flash"
    # On CPU the compiled flex step measured slower than sdpa (docs/performance.md).
    return "flex" if compiled and device.type == "cuda" else "sdpa"


@torch.library.custom_op("slowfast::flash_decode", mutates_args=())
def flash_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, scale: float
) -> torch.Tensor:
    """flash_attn_with_kvcache over the slots [starts, ends) of each row, as an op a compiled
    graph (and a CUDA graph) holds whole. query [B, 1, Hq, D], key/value [B, slots, Hkv, D]."""
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(
        query, key, value, cache_seqlens=ends, cache_leftpad=starts, softmax_scale=scale, causal=False
    )


@flash_decode.register_fake
def _flash_decode_shape(query, key, value, starts, ends, scale):
    return torch.empty_like(query)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scale: float | None):
    batch, heads, _, head_dim = query.shape
    grouped = query.view(batch, key.shape[1], heads // key.shape[1], head_dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=valid[:, None, None, :], scale=scale)
    return out.view(batch, heads, 1, head_dim)


def _flex(query, key, value, valid: torch.Tensor, first_block: torch.Tensor, last_block: torch.Tensor, scale,
          slot_zero_too: bool = False):
    """FlexAttention over the blocks [first_block, last_block] of each row, masked by `valid`
    (and slot 0 with `slot_zero_too`). The mask reads `valid` as given: inductor's CPU flex
    kernel cannot take a mask computed in the same graph."""
    batch, length = valid.shape
    blocks = length // FLEX_BLOCK
    counts = (last_block - first_block + 1).to(torch.int32).view(batch, 1, 1)
    indices = (first_block[:, None] + torch.arange(blocks, device=valid.device)).clamp(max=blocks - 1)

    def key_is_valid(b, h, q_idx, kv_idx):
        return valid[b, kv_idx] | (kv_idx == 0) if slot_zero_too else valid[b, kv_idx]

    indices = indices.to(torch.int32).view(batch, 1, 1, blocks)
    # Every block is masked per key (none is "full"); saying so explicitly, rather than leaving
    # the full blocks out, is what inductor's CPU flex kernel compiles at any batch size.
    block_mask = BlockMask.from_kv_blocks(
        counts, indices, torch.zeros_like(counts), torch.zeros_like(indices), BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=key_is_valid, seq_lengths=(1, length), compute_q_blocks=False,
    )
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=True)


def _flash(query, key, value, starts: torch.Tensor, ends: torch.Tensor, scale: float | None):
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = flash_decode(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                       starts.to(torch.int32), ends.to(torch.int32), scale)
    return out.transpose(1, 2)


@dataclass
class DecodeAttention:
    """How the layers of one decode step attend: `backend` over the cache whose valid slots
    are `key_valid` [B, slots] (the current `slot` written), and over the slow tokens."""

    backend: str
    key_valid: torch.Tensor
    slot: torch.Tensor  # [1]

    def self_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """query [B, Hq, 1, D] over the cache key/value [B, Hkv, slots, D] -> [B, Hq, 1, D]."""
        if self.backend == "sdpa":
            return _sdpa(query, key, value, self.key_valid, scale)
        first = self.key_valid.to(torch.int8).argmax(1)  # a row's first valid slot
        if self.backend == "flex":
            return _flex(query, key, value, self.key_valid, first // FLEX_BLOCK,
                         (self.slot // FLEX_BLOCK).expand_as(first), scale)
        return _flash(query, key, value, first, (self.slot + 1).expand_as(first), scale)

    def cross_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, 1, D] over slow keys/values [B, Hkv, S, D] whose valid slots
        `valid` [B, S] come first in each row -> [B, Hq, 1, D]. A row without slow tokens
        attends to slot 0 (its cross term is gated off; this only keeps it finite)."""
        counts = valid.sum(1)
        if self.backend == "sdpa":
            first_slot = torch.arange(valid.shape[1], device=valid.device) == 0
            return _sdpa(query, key, value, valid | first_slot, None)
        if self.backend == "flex":
            last = ((counts - 1) // FLEX_BLOCK).clamp(min=0)
            return _flex(query, key, value, valid, torch.zeros_like(last), last, None, slot_zero_too=True)
        return _flash(query, key, value, torch.zeros_like(counts), counts.clamp(min=1), None)
