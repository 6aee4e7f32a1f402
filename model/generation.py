"""Batched prefill + cached decode over (visual tokens, prompt) pairs.

A small gpt-fast style loop: left-padded batch, one prefill, then one token per step
with a KV cache (transformers' StaticCache for SDPA; DynamicCache with a 2-D padding
mask for flash-attn). Logits processors come from transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import Qwen2Config
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .errors import ModelInputError
from .language import (
    FAST_VISUAL,
    PADDING,
    PROMPT_TEXT,
    RESPONSE_TEXT,
    SlowTokenContext,
    cross_attention_token_mask,
)
from .modeling import SlowFastForCausalLM
from .prompt import PromptIds
from .visual_tokens import VisualTokens

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    decode_cross_attention: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ModelInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ModelInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ModelInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ModelInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def processors(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature > 0:
            processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


@dataclass(frozen=True)
class Sample:
    prompt: PromptIds
    visual: VisualTokens


@dataclass
class PromptBatch:
    """A left-padded batch of prompts with their visual tokens spliced in."""

    embeds: torch.Tensor  # [B, L, hidden]
    token_types: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool, False on left padding
    slow: SlowTokenContext

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)


def assemble(model: SlowFastForCausalLM, samples: list[Sample], context_limit: int) -> PromptBatch:
    embed = model.model.embed_tokens
    device = embed.weight.device
    rows, types = [], []
    for sample in samples:
        before = torch.tensor(sample.prompt.before_image, dtype=torch.long, device=device)
        after = torch.tensor(sample.prompt.after_image, dtype=torch.long, device=device)
        fast = sample.visual.fast.to(device=device, dtype=embed.weight.dtype)
        rows.append(torch.cat([embed(before), fast, embed(after)]))
        types.append(
            torch.cat(
                [
                    torch.full((len(before),), PROMPT_TEXT),
                    torch.full((len(fast),), FAST_VISUAL),
                    torch.full((len(after),), PROMPT_TEXT),
                ]
            )
        )
        if len(rows[-1]) > context_limit:
            raise ModelInputError(
                f"prompt is {len(rows[-1])} tokens ({len(fast)} fast visual + {len(before) + len(after)} text), "
                f"more than the context allows ({context_limit} with room for the answer)"
            )
    batch, length = len(rows), max(len(r) for r in rows)
    hidden = rows[0].shape[-1]
    embeds = torch.zeros(batch, length, hidden, dtype=embed.weight.dtype, device=device)
    token_types = torch.full((batch, length), PADDING, dtype=torch.long, device=device)
    valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for i, (row, row_types) in enumerate(zip(rows, types)):
        embeds[i, length - len(row) :] = row
        token_types[i, length - len(row) :] = row_types
        valid[i, length - len(row) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0)

    slow_len = max(s.visual.slow.shape[0] for s in samples)
    slow_states = torch.zeros(batch, slow_len, hidden, dtype=embed.weight.dtype, device=device)
    slow_valid = torch.zeros(batch, slow_len, dtype=torch.bool, device=device)
    for i, sample in enumerate(samples):
        count = sample.visual.slow.shape[0]
        slow_states[i, :count] = sample.visual.slow.to(device=device, dtype=embed.weight.dtype)
        slow_valid[i, :count] = True
    return PromptBatch(embeds, token_types, positions, valid, SlowTokenContext(slow_states, slow_valid))


class AttentionMask:
    """Self-attention masks over cache slots for a left-padded batch.

    SDPA gets a [B, 1, q, slots] boolean mask (causal + key padding); flash-attn gets the
    [B, slots] key-padding mask it unpads with (it applies causality itself).
    """

    def __init__(self, prompt_valid: torch.Tensor, total_slots: int, implementation: str):
        batch, length = prompt_valid.shape
        self.implementation = implementation
        self.key_valid = torch.zeros(batch, total_slots, dtype=torch.bool, device=prompt_valid.device)
        self.key_valid[:, :length] = prompt_valid
        self.slots = torch.arange(total_slots, device=prompt_valid.device)

    def for_queries(self, first_slot: int, count: int) -> torch.Tensor:
        end = first_slot + count
        self.key_valid[:, first_slot:end] |= first_slot > 0  # decode slots are always real tokens
        if self.implementation == "flash_attention_2":
            return self.key_valid[:, :end].long()
        query_slots = self.slots[first_slot:end, None]
        allowed = self.key_valid[:, None, :] & (self.slots[None, None, :] <= query_slots)
        # Left-padding queries see no real key; let them see themselves so no row is empty.
        allowed |= self.slots[None, None, :] == query_slots
        return allowed[:, None]


def new_cache(text_config: Qwen2Config, implementation: str, max_len: int) -> Cache:
    if implementation == "flash_attention_2":
        return DynamicCache(config=text_config)
    return StaticCache(config=text_config, max_cache_len=max_len)


def cross_mask(batch: PromptBatch, token_types: torch.Tensor, decode_cross_attention: bool) -> torch.Tensor:
    has_visual = (batch.token_types == FAST_VISUAL).any(1)
    return cross_attention_token_mask(token_types, has_visual, decode_cross_attention)


@torch.inference_mode()
def prefill_logits(model: SlowFastForCausalLM, batch: PromptBatch) -> torch.Tensor:
    """Float32 logits [B, vocab] for the first answer token (no cache kept)."""
    masks = AttentionMask(batch.valid, batch.valid.shape[1], model.attn_implementation)
    batch.slow.token_mask = cross_mask(batch, batch.token_types, decode_cross_attention=False)
    logits = model(
        batch.embeds,
        batch.positions,
        masks.for_queries(0, batch.valid.shape[1]),
        slow_context=batch.slow,
        logits_positions=slice(-1, None),
    )
    return logits[:, -1].float()


@dataclass(frozen=True)
class GeneratedSequence:
    token_ids: list[int]
    finish_reason: FinishReason


@torch.inference_mode()
def generate(
    model: SlowFastForCausalLM,
    batch: PromptBatch,
    settings: SamplingSettings,
    stop_token_ids: list[int],
) -> list[GeneratedSequence]:
    batch_size, prompt_len = batch.valid.shape
    device = batch.embeds.device
    total = prompt_len + settings.max_new_tokens
    masks = AttentionMask(batch.valid, total, model.attn_implementation)
    cache = new_cache(model.model.text_config, model.attn_implementation, total)
    processors = settings.processors()
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    stop = torch.tensor(stop_token_ids, device=device)
    response_types = torch.full((batch_size, 1), RESPONSE_TEXT, device=device)

    batch.slow.token_mask = cross_mask(batch, batch.token_types, settings.decode_cross_attention)
    logits = model(
        batch.embeds,
        batch.positions,
        masks.for_queries(0, prompt_len),
        cache=cache,
        slow_context=batch.slow,
        logits_positions=slice(-1, None),
    )[:, -1]
    generated = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    stopped_by_token = torch.zeros(batch_size, dtype=torch.bool, device=device)
    positions = batch.lengths[:, None]
    decode_mask = cross_mask(batch, response_types, settings.decode_cross_attention)

    for step in range(settings.max_new_tokens):
        scores = processors(generated, logits.float())
        if settings.temperature > 0:
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        next_tokens = torch.where(finished, stop[0] if len(stop) else next_tokens, next_tokens)
        hit_stop = torch.isin(next_tokens, stop) & ~finished
        stopped_by_token |= hit_stop
        generated = torch.cat([generated, next_tokens[:, None]], dim=1)
        finished |= hit_stop
        if bool(finished.all()) or step == settings.max_new_tokens - 1:
            break
        batch.slow.token_mask = decode_mask
        logits = model(
            model.model.embed_tokens(next_tokens[:, None]),
            positions + step,
            masks.for_queries(prompt_len + step, 1),
            cache=cache,
            slow_context=batch.slow,
        )[:, -1]

    results = []
    for row, by_token in zip(generated.tolist(), stopped_by_token.tolist()):
        if by_token:
            cut = next(i for i, tok in enumerate(row) if tok in stop_token_ids)
            results.append(GeneratedSequence(row[:cut], "stop"))
        else:
            results.append(GeneratedSequence(row, "length"))
    return results


@torch.inference_mode()
def logits_without_cache(
    model: SlowFastForCausalLM,
    batch: PromptBatch,
    response_ids: torch.Tensor,
    decode_cross_attention: bool,
) -> torch.Tensor:
    """Reference recomputation: the whole prompt + response in one uncached forward.

    Applies the same cross-attention rule as cached decoding (response tokens get the
    cross term only with `decode_cross_attention`). Returns float32 logits
    [B, response_len + 1, vocab] predicting each response token and the one after.
    """
    batch_size, prompt_len = batch.valid.shape
    count = response_ids.shape[1]
    embeds = torch.cat([batch.embeds, model.model.embed_tokens(response_ids)], dim=1)
    token_types = torch.cat(
        [batch.token_types, torch.full((batch_size, count), RESPONSE_TEXT, device=embeds.device)], dim=1
    )
    offsets = torch.arange(count, device=embeds.device)[None, :]
    positions = torch.cat([batch.positions, batch.lengths[:, None] + offsets], dim=1)
    valid = torch.cat([batch.valid, torch.ones(batch_size, count, dtype=torch.bool, device=embeds.device)], dim=1)
    masks = AttentionMask(valid, valid.shape[1], model.attn_implementation)
    batch.slow.token_mask = cross_mask(batch, token_types, decode_cross_attention)
    logits = model(
        embeds,
        positions,
        masks.for_queries(0, valid.shape[1]),
        slow_context=batch.slow,
        logits_positions=slice(prompt_len - 1, None),
    )
    return logits.float()
