"""Decode attention backends on CPU: FlexAttention (eager and compiled) against SDPA on a mixed,
padded batch of the tiny checkpoint. flash-attn's kernel needs CUDA: only its refusal here."""

from __future__ import annotations

import pytest
import torch

from model import TextQuery, VideoQuery, generation
from model.decode_attention import resolve_decode_attention
from model.errors import UnsupportedConfigError

NEW_TOKENS = 8
QUESTIONS = ["Is there a red circle?", "Please describe this video in detail.", "What moves, and where does it go?"]
# Dynamo's full-graph trace, run as is: shows the step compiles whole without inductor's C++ builds.
TRACE_ONLY = "eager"

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def mixed_queries(vlm):
    """Three questions on one clip, two on a longer one, a text-only prompt: shared heads of two
    lengths, tails of several, left padding in both, and 6 rows (a compiled step pads to 8)."""
    g = torch.Generator().manual_seed(1)
    shape = (vlm.config.tokens_per_frame, vlm.config.hidden_size)
    first, second = (torch.randn(n, *shape, generator=g) for n in (4, 6))
    return ([VideoQuery(features=first, question=q) for q in QUESTIONS]
            + [VideoQuery(features=second, question=q) for q in QUESTIONS[:2]]
            + [TextQuery("Summarise: a red circle moves left, then a blue square appears.")])


class RecordingStep:
    """A decoder's step that keeps a copy of each step's logits."""

    def __init__(self, step):
        self.step, self.logits = step, []

    def __call__(self, *args):
        out = self.step(*args)
        self.logits.append(out.clone())
        return out

    def __getattr__(self, name):
        return getattr(self.step, name)


def decode(decoder, vlm, queries, decode_cross_attention):
    """Greedy ids of each row and the decode steps' logits [steps, rows, vocab]."""
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS, decode_cross_attention=decode_cross_attention)
    attribute = "compiled_step" if decoder.compiled_step is not None else "step"
    recording = RecordingStep(getattr(decoder, attribute))
    setattr(decoder, attribute, recording)
    answers = decoder.generate(vlm._batch(queries, NEW_TOKENS), settings, [])
    rows = len(queries)
    return [a.token_ids for a in answers], torch.stack([logits[:rows] for logits in recording.logits])


@pytest.mark.parametrize("decode_cross_attention", [False, True])
def test_flex_decode_gives_the_logits_and_greedy_ids_of_sdpa(tiny_vlm, decode_cross_attention):
    queries = mixed_queries(tiny_vlm)
    sdpa = generation.Decoder(tiny_vlm.network, decode_attention="sdpa")
    reference_ids, reference = decode(sdpa, tiny_vlm, queries, decode_cross_attention)
    assert reference.shape[0] == NEW_TOKENS - 1 and len(set(map(tuple, reference_ids))) > 1
    for decoder in (generation.Decoder(tiny_vlm.network, decode_attention="flex"),
                    generation.Decoder(tiny_vlm.network, compile=True, backend=TRACE_ONLY, decode_attention="flex")):
        assert decoder.decode_attention == "flex"
        ids, logits = decode(decoder, tiny_vlm, queries, decode_cross_attention)
        if decoder.compiled_step is not None:
            assert decoder.compiled, "the flex decode step fell back to eager: fullgraph compilation failed"
        assert ids == reference_ids
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow(seconds=80)
def test_flex_decode_compiled_by_inductor_on_cpu_equals_sdpa(tiny_vlm):
    """Inductor's CPU flex kernel, without the decode cross term: with it, inductor (torch 2.13)
    cannot fuse the term's arithmetic into that kernel and the step falls back to eager."""
    queries = mixed_queries(tiny_vlm)
    reference_ids, reference = decode(generation.Decoder(tiny_vlm.network, decode_attention="sdpa"), tiny_vlm, queries, False)
    compiled = generation.Decoder(tiny_vlm.network, compile=True, decode_attention="flex")
    ids, logits = decode(compiled, tiny_vlm, queries, False)
    assert compiled.compiled, "inductor could not compile the flex decode step"
    assert ids == reference_ids
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_after_the_prefill_each_rows_valid_slots_are_contiguous_and_end_at_the_prompt(tiny_vlm):
    """What flash-attn's cache_leftpad needs: valid slots [start, prompt end) in every decoding
    row, though a shared head is packed with several tails and each packed row is padded on the
    left."""
    queries = mixed_queries(tiny_vlm)
    batch = tiny_vlm._batch(queries, NEW_TOKENS)
    assert batch.prefix is not None
    decoder = generation.Decoder(tiny_vlm.network)
    decoder.decode_attention = "flash"  # the prefill it gets (flash itself cannot run here)
    every = torch.arange(len(queries))
    with torch.inference_mode():
        packed, _, buffers = decoder._prompts_into_cache(batch, generation.SamplingSettings(max_new_tokens=1), every, 1)
    prompt_len = packed.segments.shape[1]
    valid = buffers.key_valid[: len(queries), :prompt_len]
    lengths = batch.lengths
    assert (lengths < prompt_len).all()  # every row had other tails or padding beside its own
    expected = torch.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
    assert torch.equal(valid, expected)


def test_auto_is_sdpa_on_cpu_and_flash_is_refused_in_one_line(tiny_vlm):
    assert generation.Decoder(tiny_vlm.network).decode_attention == "sdpa"
    assert generation.Decoder(tiny_vlm.network, compile=True, backend=TRACE_ONLY).decode_attention == "sdpa"
    cpu = torch.device("cpu")
    with pytest.raises(UnsupportedConfigError) as refused:
        resolve_decode_attention("flash", cpu, torch.bfloat16, compiled=True)
    assert "flash-attn" in str(refused.value) and "cpu" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UnsupportedConfigError, match="not one of auto, sdpa, flex, flash"):
        resolve_decode_attention("paged", cpu, torch.float32, compiled=False)
