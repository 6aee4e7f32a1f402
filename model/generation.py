"""Batched prefill + cached decode over (visual tokens, prompt) pairs.

A gpt-fast style loop: left-padded batch, one eager prefill into a static KV cache,
then one token per step through `DecodeStep`, a pure tensor function that can be
compiled whole and captured in a CUDA graph. Logits processors come from transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .compiled import CompiledOrEager
from .decode_attention import DecodeAttention, DecodeAttentionChoice, resolve_decode_attention
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
T = TypeVar("T")


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
    """A left-padded batch of prompts with their visual tokens spliced in.

    With `prefix`, the rows are the tails of prompts whose heads several rows share (a
    window's system turn and video tokens): the prefill packs each head with its tails
    (`PackedPrompts`), so a head is computed once and each row adds only its own tokens (its
    question and the assistant's turn), at positions after its head.
    """

    embeds: torch.Tensor  # [B, L, hidden]
    token_types: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool, False on left padding
    slow: SlowTokenContext  # a row's slow tokens; with `prefix`, a head's (the rows share them)
    has_visual: torch.Tensor  # [B] bool: the prompt holds video tokens (its head's, when shared)
    prefix: SharedPrefixes | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Valid tokens of each row's whole prompt."""
        own = self.valid.sum(1)
        return own if self.prefix is None else own + self.prefix.row_valid.sum(1)


@dataclass
class SharedPrefixes:
    """The distinct prompt heads of a batch, and which one each row continues."""

    batch: PromptBatch  # [W, P]
    of_row: torch.Tensor  # [B] long: the row's head; -1 for a row without one (a text-only prompt)

    @property
    def row_valid(self) -> torch.Tensor:
        """[B, P] bool: the valid slots of each row's head."""
        return self.batch.valid[self.of_row.clamp(min=0)] & (self.of_row >= 0)[:, None]


@dataclass
class PackedPrompts:
    """A batch laid out for one prefill: each shared head and every tail that continues it in
    one row, [head][tail 1][tail 2]..., left-padded. A tail attends to its head and to itself
    only, at the positions it has after its head alone, so its scores are those of its whole
    prompt; a head is computed once, and no head's keys/values are copied for its tails."""

    embeds: torch.Tensor  # [R, L, hidden]
    token_types: torch.Tensor  # [R, L]
    positions: torch.Tensor  # [R, L]
    segments: torch.Tensor  # [R, L] long: 0 the head, k >= 1 the row's k-th tail, -1 padding
    slow: SlowTokenContext  # [R]: the head's slow tokens
    has_visual: torch.Tensor  # [R] bool
    row_of: torch.Tensor  # [B] long: the packed row holding each prompt of the batch
    segment_of: torch.Tensor  # [B] long: the prompt's tail in that row
    last_slot: torch.Tensor  # [B] long: the slot of the prompt's last token

    @property
    def valid(self) -> torch.Tensor:
        return self.segments >= 0

    def attention_mask(self, total_slots: int) -> torch.Tensor:
        """[R, 1, L, total_slots] bool: causal, and a tail sees its head and itself only."""
        rows, length = self.segments.shape
        device = self.segments.device
        keys = torch.full((rows, total_slots), -1, dtype=torch.long, device=device)
        keys[:, :length] = self.segments
        query_slots = torch.arange(length, device=device)[None, :, None]
        key_slots = torch.arange(total_slots, device=device)[None, None, :]
        queries, keys = self.segments[:, :, None], keys[:, None, :]
        allowed = (keys >= 0) & ((keys == 0) | (keys == queries)) & (key_slots <= query_slots)
        # Left-padding queries see no real key; let them see themselves so no row is empty.
        allowed |= key_slots == query_slots
        return allowed[:, None]

    def prompt_slots(self, prompts: torch.Tensor) -> torch.Tensor:
        """[len(prompts), L] bool: the slots of each prompt's head and tail in its row."""
        segments = self.segments[self.row_of[prompts]]
        return (segments == 0) | (segments == self.segment_of[prompts][:, None])


def pack(batch: PromptBatch) -> PackedPrompts:
    """The batch's prompts, each shared head with its tails in one row (a prompt without a
    shared head is a row of its own)."""
    rows, length = batch.valid.shape
    device = batch.embeds.device
    if batch.prefix is None:
        return PackedPrompts(
            batch.embeds, batch.token_types, batch.positions, torch.where(batch.valid, 1, -1), batch.slow,
            batch.has_visual, torch.arange(rows, device=device), torch.ones(rows, dtype=torch.long, device=device),
            torch.full((rows,), length - 1, dtype=torch.long, device=device),
        )
    heads, of_row = batch.prefix.batch, batch.prefix.of_row.tolist()
    # Rows are left-padded: a row's tokens are its last `count` (counted on the host once).
    head_counts, tail_counts = heads.valid.sum(1).tolist(), batch.valid.sum(1).tolist()
    groups: dict[int, list[int]] = {}  # head -> its prompts, in batch order; a headless prompt alone
    for prompt, head in enumerate(of_row):
        groups.setdefault(head if head >= 0 else -1 - prompt, []).append(prompt)
    packed_rows, totals, row_of, segment_of, ends = [], [], [0] * rows, [0] * rows, [0] * rows
    for packed_row, (head, prompts) in enumerate(groups.items()):
        parts, total = [], 0
        if head >= 0:
            keep = slice(heads.valid.shape[1] - head_counts[head], None)
            parts.append((heads.embeds[head, keep], heads.token_types[head, keep], heads.positions[head, keep], 0))
            total = head_counts[head]
        for segment, prompt in enumerate(prompts, 1):
            keep = slice(length - tail_counts[prompt], None)
            parts.append((batch.embeds[prompt, keep], batch.token_types[prompt, keep], batch.positions[prompt, keep],
                          segment))
            total += tail_counts[prompt]
            row_of[prompt], segment_of[prompt], ends[prompt] = packed_row, segment, total
        packed_rows.append(parts)
        totals.append(total)
    count, width = len(packed_rows), max(totals)
    embeds = batch.embeds.new_zeros(count, width, batch.embeds.shape[2])
    token_types = torch.full((count, width), PADDING, dtype=torch.long, device=device)
    positions = torch.zeros(count, width, dtype=torch.long, device=device)
    segments = torch.full((count, width), -1, dtype=torch.long, device=device)
    for packed_row, parts in enumerate(packed_rows):
        start = width - totals[packed_row]
        for part_embeds, part_types, part_positions, segment in parts:
            end = start + len(part_embeds)
            embeds[packed_row, start:end] = part_embeds
            token_types[packed_row, start:end] = part_types
            positions[packed_row, start:end] = part_positions
            segments[packed_row, start:end] = segment
            start = end
    last_slot = [width - totals[row_of[prompt]] + ends[prompt] - 1 for prompt in range(rows)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    head_of_row = as_tensor(list(groups))
    with_head, pick = head_of_row >= 0, head_of_row.clamp(min=0)  # a headless row gets a head's slow tokens, all masked
    slow = SlowTokenContext(heads.slow.states[pick], heads.slow.valid[pick] & with_head[:, None])
    return PackedPrompts(
        embeds, token_types, positions, segments, slow, heads.has_visual[pick] & with_head,
        as_tensor(row_of), as_tensor(segment_of), as_tensor(last_slot),
    )


def _sample_tokens(embed: nn.Embedding, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's embeddings and token types, in order: text before, fast visual, text after."""
    device = embed.weight.device
    before = torch.tensor(sample.prompt.before_image, dtype=torch.long, device=device)
    after = torch.tensor(sample.prompt.after_image, dtype=torch.long, device=device)
    fast = sample.visual.fast.to(device=device, dtype=embed.weight.dtype)
    embeds = torch.cat([embed(before), fast, embed(after)])
    types = torch.cat([torch.full((len(before),), PROMPT_TEXT), torch.full((len(fast),), FAST_VISUAL),
                       torch.full((len(after),), PROMPT_TEXT)])
    return embeds, types


def _left_padded(embed: nn.Embedding, rows: list[tuple[torch.Tensor, torch.Tensor]], first_positions: torch.Tensor):
    """(embeds, token types, positions, valid) of rows padded on the left to the longest."""
    device = embed.weight.device
    batch, length = len(rows), max(len(r) for r, _ in rows)
    embeds = torch.zeros(batch, length, embed.weight.shape[1], dtype=embed.weight.dtype, device=device)
    token_types = torch.full((batch, length), PADDING, dtype=torch.long, device=device)
    valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for i, (row, row_types) in enumerate(rows):
        embeds[i, length - len(row) :] = row
        token_types[i, length - len(row) :] = row_types
        valid[i, length - len(row) :] = True
    positions = (valid.cumsum(1) - 1).clamp(min=0) + first_positions[:, None]
    return embeds, token_types, positions, valid


def _slow_tokens(embed: nn.Embedding, samples: list[Sample]) -> SlowTokenContext:
    device, dtype = embed.weight.device, embed.weight.dtype
    slow_len = max(s.visual.slow.shape[0] for s in samples)
    slow_states = torch.zeros(len(samples), slow_len, embed.weight.shape[1], dtype=dtype, device=device)
    slow_valid = torch.zeros(len(samples), slow_len, dtype=torch.bool, device=device)
    for i, sample in enumerate(samples):
        count = sample.visual.slow.shape[0]
        slow_states[i, :count] = sample.visual.slow.to(device=device, dtype=dtype)
        slow_valid[i, :count] = True
    return SlowTokenContext(slow_states, slow_valid)


def _check_length(length: int, visual: int, context_limit: int) -> None:
    if length > context_limit:
        raise ModelInputError(
            f"prompt is {length} tokens ({visual} fast visual + {length - visual} text), "
            f"more than the context allows ({context_limit} with room for the answer)"
        )


def assemble(model: SlowFastForCausalLM, samples: list[Sample], context_limit: int) -> PromptBatch:
    embed = model.model.embed_tokens
    rows = [_sample_tokens(embed, sample) for sample in samples]
    for (row, _), sample in zip(rows, samples):
        _check_length(len(row), len(sample.visual.fast), context_limit)
    zeros = torch.zeros(len(rows), dtype=torch.long, device=embed.weight.device)
    embeds, token_types, positions, valid = _left_padded(embed, rows, zeros)
    has_visual = (token_types == FAST_VISUAL).any(1)
    return PromptBatch(embeds, token_types, positions, valid, _slow_tokens(embed, samples), has_visual)


def assemble_shared(
    model: SlowFastForCausalLM, heads: list[Sample], rows: list[tuple[int, list[int]]], context_limit: int
) -> PromptBatch:
    """Rows that continue shared heads: `heads` hold the text before the video and the video
    tokens (nothing after); each row is (its head's index, or -1 for none, the ids that follow)."""
    embed = model.model.embed_tokens
    device = embed.weight.device
    head_batch = assemble(model, heads, context_limit)
    of_row = torch.tensor([index for index, _ in rows], dtype=torch.long, device=device)
    prefixes = SharedPrefixes(head_batch, of_row)
    head_lengths = prefixes.row_valid.sum(1)
    no_video = embed.weight.new_zeros(0, embed.weight.shape[1])
    tails = [_sample_tokens(embed, Sample(PromptIds(ids, []), VisualTokens(no_video, no_video))) for _, ids in rows]
    for (tail, _), head_length, (index, _) in zip(tails, head_lengths.tolist(), rows):
        visual = len(heads[index].visual.fast) if index >= 0 else 0
        _check_length(head_length + len(tail), visual, context_limit)
    embeds, token_types, positions, valid = _left_padded(embed, tails, head_lengths)
    has_visual = head_batch.has_visual[of_row.clamp(min=0)] & (of_row >= 0)
    return PromptBatch(embeds, token_types, positions, valid, head_batch.slow, has_visual, prefixes)


class AttentionMask:
    """SDPA self-attention masks [B, 1, q, slots] over cache slots for a left-padded batch
    (causal + key padding)."""

    def __init__(self, prompt_valid: torch.Tensor, total_slots: int):
        batch, length = prompt_valid.shape
        self.key_valid = torch.zeros(batch, total_slots, dtype=torch.bool, device=prompt_valid.device)
        self.key_valid[:, :length] = prompt_valid
        self.slots = torch.arange(total_slots, device=prompt_valid.device)

    def for_queries(self, first_slot: int, count: int) -> torch.Tensor:
        query_slots = self.slots[first_slot : first_slot + count, None]
        allowed = self.key_valid[:, None, :] & (self.slots[None, None, :] <= query_slots)
        # Left-padding queries see no real key; let them see themselves so no row is empty.
        allowed |= self.slots[None, None, :] == query_slots
        return allowed[:, None]


def cross_mask(batch: PromptBatch, token_types: torch.Tensor, decode_cross_attention: bool) -> torch.Tensor:
    return cross_attention_token_mask(token_types, batch.has_visual, decode_cross_attention)


@dataclass(frozen=True)
class GeneratedSequence:
    token_ids: list[int]
    finish_reason: FinishReason
    first_logits: torch.Tensor  # float32 [vocab]: the prefill's scores for the first token, before sampling


class StaticKVCache:
    """Per-layer key/value buffers of a fixed size [B, Hkv, slots, D], written in place.

    It offers the one method transformers' attention layers call on a cache, `update`,
    whose extra arguments differ between 5.x versions and are not needed here: the
    slots written are `write_slots` (the prompt's at prefill, one slot per decode step),
    and the whole buffer is returned, masked by the caller. `rows` limits a prefill to
    the real rows of a batch padded up to its size bucket.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_slots: torch.Tensor, rows: int | None = None):
        self.keys, self.values, self.write_slots, self.rows = keys, values, write_slots, rows

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is not None:
            keys, values = keys[: self.rows], values[: self.rows]
        keys.index_copy_(2, self.write_slots, key.to(keys.dtype))
        values.index_copy_(2, self.write_slots, value.to(values.dtype))
        return keys, values


@dataclass
class DecodeBuffers:
    """Device memory a decode of one (rows, slots) size reuses from call to call.

    A CUDA graph reads and writes fixed addresses, so the cache, the key-validity row and
    the slow tokens' keys/values live here instead of being allocated per call.
    """

    keys: list[torch.Tensor]  # per layer [rows, Hkv, slots, D]
    values: list[torch.Tensor]
    key_valid: torch.Tensor  # [rows, slots] bool: prompt tokens and decode slots written so far

    @classmethod
    def allocate(cls, config: Qwen2Config, rows: int, slots: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (rows, config.num_key_value_heads, slots, head_dim)
        layers = range(config.num_hidden_layers)
        buffers = cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            key_valid=torch.zeros(rows, slots, dtype=torch.bool, device=device),
        )
        for tensor in (*buffers.keys, *buffers.values, buffers.key_valid):
            torch._dynamo.mark_static_address(tensor)
        return buffers


@dataclass
class SlowBuffers:
    """Static copies of the prefill's slow-token keys/values, for decode steps that cross-attend."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # hybrid layer -> keys, values [rows, Hkv, S, D]
    valid: torch.Tensor  # [rows, S] bool
    rows_with_visual: torch.Tensor  # [rows, 1] bool: the decode steps' token mask

    @classmethod
    def allocate(cls, like: SlowTokenContext, rows: int, length: int):
        kv = {
            layer: tuple(torch.zeros(rows, t.shape[1], length, t.shape[3], dtype=t.dtype, device=t.device) for t in pair)
            for layer, pair in like.kv.items()
        }
        buffers = cls(kv, torch.zeros(rows, length, dtype=torch.bool, device=like.valid.device),
                      torch.zeros(rows, 1, dtype=torch.bool, device=like.valid.device))
        for tensor in (*(t for pair in kv.values() for t in pair), buffers.valid, buffers.rows_with_visual):
            torch._dynamo.mark_static_address(tensor)
        return buffers

    def load(self, slow: SlowTokenContext, rows_with_visual: torch.Tensor) -> SlowTokenContext:
        rows, length = slow.valid.shape
        self.valid.zero_()
        self.valid[:rows, :length] = slow.valid
        self.rows_with_visual.zero_()
        self.rows_with_visual[:rows, 0] = rows_with_visual
        for layer, (keys, values) in slow.kv.items():
            self.kv[layer][0][:rows, :, :length] = keys
            self.kv[layer][1][:rows, :, :length] = values
        return SlowTokenContext(None, self.valid, self.rows_with_visual, dict(self.kv))


class DecodeStep(nn.Module):
    """One decode step as a pure function of tensors: no host sync, no Python branching on
    values, fixed shapes. So it can be compiled with `fullgraph=True` and captured in a
    CUDA graph; uncompiled it is the eager path, with the same arithmetic. Its attention
    runs the `decode_attention` backend ("sdpa", "flex" or "flash": decode_attention.py)."""

    def __init__(self, network: SlowFastForCausalLM, decode_attention: str = "sdpa"):
        super().__init__()
        self.network = network
        self.decode_attention = decode_attention

    def forward(
        self,
        tokens: torch.Tensor,  # [rows] the previous step's tokens
        positions: torch.Tensor,  # [rows, 1] their rotary positions
        slot: torch.Tensor,  # [1] the cache slot they are written to (the same for every row)
        buffers: DecodeBuffers,
        slow: SlowTokenContext | None,  # None: the cross term is off for generated tokens
    ) -> torch.Tensor:
        buffers.key_valid.index_fill_(1, slot, True)
        cache = StaticKVCache(buffers.keys, buffers.values, slot)
        embeds = self.network.model.embed_tokens(tokens[:, None])
        attention = DecodeAttention(self.decode_attention, buffers.key_valid, slot)
        return self.network(embeds, positions, None, cache=cache, slow_context=slow, decode_attention=attention)[:, -1].float()


@torch.inference_mode()
def prefill_logits(model: SlowFastForCausalLM, batch: PromptBatch) -> torch.Tensor:
    """Float32 logits [B, vocab] for the first answer token (no cache kept)."""
    masks = AttentionMask(batch.valid, batch.valid.shape[1])
    batch.slow.token_mask = cross_mask(batch, batch.token_types, decode_cross_attention=False)
    logits = model(
        batch.embeds,
        batch.positions,
        masks.for_queries(0, batch.valid.shape[1]),
        slow_context=batch.slow,
        logits_positions=slice(-1, None),
    )
    return logits[:, -1].float()


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _kept(kept: dict[tuple[int, int], T], size: tuple[int, int], most: int, allocate: Callable[[], T]) -> T:
    """The buffers of `size` from `kept`, allocated if missing; `kept` keeps the `most` sizes used
    last (a dict keeps its order of insertion: the first key is the least recently used)."""
    buffers = kept.pop(size, None)
    kept[size] = buffers if buffers is not None else allocate()
    while len(kept) > most:
        del kept[next(iter(kept))]
    return kept[size]


class Decoder:
    """Prefill + cached decode over a static KV cache, eager or with a compiled step.

    Shapes are bucketed so a compiled step meets few distinct shapes: cache slots are
    rounded up to SLOT_BLOCK, and with compilation the batch is padded up to a power of
    two (padding rows decode a dummy token whose output is discarded). Buffers of each
    size are kept for the next call, those of the KEPT_SIZES sizes used last (a long run
    meets many sizes). Rows that have finished keep stepping until the whole batch has:
    the host checks that every STOP_CHECK_EVERY steps (one sync), so a batch that
    finishes early costs at most that many extra steps.

    With `compile=True` the step is compiled (`fullgraph=True`, `mode` e.g.
    "reduce-overhead" for CUDA graphs) on first use per shape; if that fails, a warning is
    logged and the eager step is used from then on.

    `decode_attention` picks the step's attention kernel ("auto", "sdpa", "flex", "flash":
    decode_attention.py); `self.decode_attention` is the backend it resolved to. For flash,
    after the prefill each decoding row's valid cache slots are contiguous and end at the
    prompt's last slot. Rows with nothing to decode (a budget of 0) leave the batch after the
    prefill.
    """

    SLOT_BLOCK = 256
    STOP_CHECK_EVERY = 8
    # Compiled, the batch sizes are powers of two: this holds a deployment's usual sizes. Eager
    # (CPU), every row count is a size of its own and the least recently used go.
    KEPT_SIZES = 8

    def __init__(self, network: SlowFastForCausalLM, compile: bool = False, mode: str | None = None,
                 backend: str | Callable = "inductor", decode_attention: DecodeAttentionChoice = "auto"):
        self.network = network
        weight = network.model.embed_tokens.weight
        self.decode_attention = resolve_decode_attention(decode_attention, weight.device, weight.dtype, compile)
        self.step = DecodeStep(network, self.decode_attention)
        self.compiled_step = CompiledOrEager(self.step, "decode step", mode=mode, backend=backend) if compile else None
        self._buffers: dict[tuple[int, int], DecodeBuffers] = {}
        self._slow_buffers: dict[tuple[int, int], SlowBuffers] = {}

    @property
    def compiled(self) -> bool:
        return self.compiled_step is not None and self.compiled_step.active

    def release_buffers(self) -> None:
        """Drop the kept cache buffers (the next call of each size allocates again)."""
        self._buffers.clear()
        self._slow_buffers.clear()

    def _decode_buffers(self, rows: int, slots: int) -> DecodeBuffers:
        weight = self.network.model.embed_tokens.weight
        return _kept(self._buffers, (rows, slots), self.KEPT_SIZES, lambda: DecodeBuffers.allocate(
            self.network.model.text_config, rows, slots, weight.dtype, weight.device))

    def _slow_context(self, slow: SlowTokenContext, has_visual: torch.Tensor, rows: int) -> SlowTokenContext:
        length = _round_up(slow.valid.shape[1], self.SLOT_BLOCK)
        buffers = _kept(self._slow_buffers, (rows, length), self.KEPT_SIZES,
                        lambda: SlowBuffers.allocate(slow, rows, length))
        return buffers.load(slow, has_visual)

    def _decode_rows_from(self, buffers: DecodeBuffers, sources: torch.Tensor, valid: torch.Tensor, prompt_len: int,
                          slots: int) -> DecodeBuffers:
        """Decode rows copied from the prefill's rows `sources` (a row may be copied more than
        once), into buffers of their own size; `valid` [rows, prompt_len] are the slots each may
        attend (its head and its own tail)."""
        rows = len(sources)
        target = self._decode_buffers(_next_power_of_two(rows) if self.compiled else rows, slots)
        target.key_valid.zero_()
        target.key_valid[:rows, :prompt_len] = valid
        for source, cache in zip((*buffers.keys, *buffers.values), (*target.keys, *target.values)):
            # Indexing copies the rows out before they are written: both sizes can be one bucket.
            cache[:rows, :, :prompt_len] = source[sources, :, :prompt_len]
        return target

    @staticmethod
    def _right_align_prompts(buffers: DecodeBuffers, rows: int, prompt_len: int) -> None:
        """Move each row's valid prompt slots (its head's and its tail's, with padding and other
        tails between) to the end of the prompt's slots, in order, so they are contiguous as
        flash-attn's `cache_leftpad` needs. Attention does not depend on slot order: the keys
        already hold their rotary positions."""
        valid = buffers.key_valid[:rows, :prompt_len]
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices  # padding first
        for cache in (*buffers.keys, *buffers.values):
            region = cache[:rows, :, :prompt_len]
            region.copy_(region.gather(2, order[:, None, :, None].expand_as(region)))
        buffers.key_valid[:rows, :prompt_len] = valid.gather(1, order)

    def _prefill(self, packed: PackedPrompts, buffers: DecodeBuffers, settings: SamplingSettings) -> torch.Tensor:
        """The packed prompts into the cache; returns each prompt's first-token logits [B, vocab]."""
        rows, length = packed.segments.shape
        device = packed.embeds.device
        buffers.key_valid[:rows, :length] = packed.valid
        packed.slow.token_mask = cross_attention_token_mask(packed.token_types, packed.has_visual,
                                                            settings.decode_cross_attention)
        return self.network(
            packed.embeds,
            packed.positions,
            packed.attention_mask(buffers.key_valid.shape[1]),
            cache=StaticKVCache(buffers.keys, buffers.values, torch.arange(length, device=device), rows=rows),
            slow_context=packed.slow,
            logits_positions=(packed.row_of, packed.last_slot),
        ).float()

    def _prompts_into_cache(self, batch: PromptBatch, settings: SamplingSettings, decoding: torch.Tensor,
                            steps: int) -> tuple[PackedPrompts, torch.Tensor, DecodeBuffers]:
        """Prefill the batch, packed; returns the packing, every prompt's first-token logits and
        the buffers whose first rows hold the prompts `decoding`, each attending its own slots
        (contiguous and ending at the prompt's last slot for flash). Prompts that produce no
        token (probability-only questions) leave after the prefill."""
        packed = pack(batch)
        packed_rows, prompt_len = packed.segments.shape
        slots = _round_up(prompt_len + steps, self.SLOT_BLOCK)
        buffers = self._decode_buffers(_next_power_of_two(packed_rows) if self.compiled else packed_rows, slots)
        buffers.key_valid.zero_()
        first_logits = self._prefill(packed, buffers, settings)
        sources, valid = packed.row_of[decoding], packed.prompt_slots(decoding)
        if sources.tolist() == list(range(packed_rows)):  # each row decodes its one prompt: in place
            buffers.key_valid[:packed_rows, :prompt_len] = valid
        elif len(decoding):
            buffers = self._decode_rows_from(buffers, sources, valid, prompt_len, slots)
        if self.decode_attention == "flash":
            self._right_align_prompts(buffers, len(decoding), prompt_len)
        return packed, first_logits, buffers

    @torch.inference_mode()
    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, stop_token_ids: list[int], budgets: list[int] | None = None
    ) -> list[GeneratedSequence]:
        """`budgets`: new tokens per row (default `settings.max_new_tokens` each); a row with 0
        only has its first-token scores. The batch stops stepping once every row is done."""
        device = batch.embeds.device
        all_budgets = budgets if budgets is not None else [settings.max_new_tokens] * batch.valid.shape[0]
        steps = max(all_budgets)
        decoding = [row for row, budget in enumerate(all_budgets) if budget > 0]
        keep = torch.tensor(decoding, dtype=torch.long, device=device)
        packed, first_logits, buffers = self._prompts_into_cache(batch, settings, keep, steps)
        prompt_len = packed.segments.shape[1]
        rows, budgets = len(decoding), [all_budgets[row] for row in decoding]
        padded_rows = buffers.key_valid.shape[0]
        sources = packed.row_of[keep]
        logits, lengths, has_visual = first_logits[keep], batch.lengths[keep], packed.has_visual[sources]
        slow_source = SlowTokenContext(None, packed.slow.valid[sources], None,
                                       {layer: (k[sources], v[sources]) for layer, (k, v) in packed.slow.kv.items()})
        slow = self._slow_context(slow_source, has_visual, padded_rows) if settings.decode_cross_attention and steps else None

        processors = settings.processors()
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=device).manual_seed(settings.seed)
        stop = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
        budget = torch.tensor(budgets, dtype=torch.long, device=device)
        generated = torch.zeros(rows, steps, dtype=torch.long, device=device)
        finished = budget == 0
        stopped_by_token = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens = torch.zeros(padded_rows, dtype=torch.long, device=device)
        first_positions = torch.zeros(padded_rows, 1, dtype=torch.long, device=device)
        first_positions[:rows, 0] = lengths
        first_slot = torch.full((1,), prompt_len, dtype=torch.long, device=device)

        produced = steps
        for step in range(steps):
            scores = processors(generated[:, :step], logits)
            if settings.temperature > 0:
                next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            if len(stop_token_ids):
                next_tokens = torch.where(finished, stop[0], next_tokens)
                hit_stop = torch.isin(next_tokens, stop) & ~finished
                stopped_by_token |= hit_stop
                finished |= hit_stop
            generated[:, step] = next_tokens
            finished |= budget <= step + 1
            if step == steps - 1:
                break
            if (step + 1) % self.STOP_CHECK_EVERY == 0 and bool(finished.all()):
                produced = step + 1
                break
            tokens[:rows] = next_tokens
            logits = (self.compiled_step or self.step)(tokens, first_positions + step, first_slot + step, buffers, slow)[:rows]

        decoded = {}
        rows_out = generated[:, :produced].tolist()
        for index, row, by_token, row_budget in zip(decoding or range(rows), rows_out, stopped_by_token.tolist(), budgets):
            row = row[:row_budget]
            cut = next(i for i, tok in enumerate(row) if tok in stop_token_ids) if by_token else len(row)
            decoded[index] = (row[:cut], "stop" if by_token else "length")
        return [GeneratedSequence(*decoded.get(index, ([], "length")), first_logits[index])
                for index in range(len(all_budgets))]


def generate(
    model: SlowFastForCausalLM,
    batch: PromptBatch,
    settings: SamplingSettings,
    stop_token_ids: list[int],
) -> list[GeneratedSequence]:
    """Eager generation (a Decoder of its own, no compilation)."""
    return Decoder(model).generate(batch, settings, stop_token_ids)


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
    masks = AttentionMask(valid, valid.shape[1])
    batch.slow.token_mask = cross_mask(batch, token_types, decode_cross_attention)
    logits = model(
        embeds,
        positions,
        masks.for_queries(0, valid.shape[1]),
        slow_context=batch.slow,
        logits_positions=slice(prompt_len - 1, None),
    )
    return logits.float()
