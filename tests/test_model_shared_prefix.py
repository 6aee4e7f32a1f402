"""Encode once, ask many: questions about one clip share one prefill of its head (system turn
and video tokens), and give what separate full prompts give (CPU fp32, the tiny checkpoint)."""

from __future__ import annotations

import pytest
import torch

from model import TextQuery, VideoQuery, generation

NEW_TOKENS = 12
QUESTIONS = ["Is there a red circle?", "Please describe this video in detail.", "What moves, and where does it go?"]


def clips(vlm, frame_counts=(4, 6)):
    """Per-frame features of two clips of different lengths (their heads pad differently)."""
    g = torch.Generator().manual_seed(1)
    shape = (vlm.config.tokens_per_frame, vlm.config.hidden_size)
    return [torch.randn(n, *shape, generator=g) for n in frame_counts]


def mixed_queries(vlm):
    """Three questions on one clip, two on another, and a text-only prompt: padding everywhere."""
    first, second = clips(vlm)
    return ([VideoQuery(features=first, question=q) for q in QUESTIONS]
            + [VideoQuery(features=second, question=q) for q in QUESTIONS[:2]]
            + [TextQuery("Summarise: a red circle moves left, then a blue square appears.")])


def run(vlm, queries, share: bool, decode_cross_attention: bool):
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS, decode_cross_attention=decode_cross_attention)
    batch = vlm._batch(queries, room_for_answer=NEW_TOKENS, share_prefixes=share)
    return batch, generation.Decoder(vlm.network).generate(batch, settings, [])


@pytest.mark.parametrize("decode_cross_attention", [False, True])
def test_shared_heads_give_the_first_token_logits_and_greedy_ids_of_full_prompts(tiny_vlm, decode_cross_attention):
    queries = mixed_queries(tiny_vlm)
    batch, shared = run(tiny_vlm, queries, share=True, decode_cross_attention=decode_cross_attention)
    assert batch.prefix is not None and batch.prefix.batch.valid.shape[0] == 2  # two clips, two heads
    assert batch.prefix.of_row.tolist() == [0, 0, 0, 1, 1, -1]
    _, full = run(tiny_vlm, queries, share=False, decode_cross_attention=decode_cross_attention)
    for mine, reference in zip(shared, full):
        error = (mine.first_logits - reference.first_logits).abs().max() / reference.first_logits.abs().max()
        assert error <= 1e-5
        assert mine.token_ids == reference.token_ids
    # and each alone, unpadded
    for query, mine in zip(queries, shared):
        _, (alone,) = run(tiny_vlm, [query], share=False, decode_cross_attention=decode_cross_attention)
        assert mine.token_ids == alone.token_ids


def test_a_clip_is_prefilled_once_however_many_questions_ask_about_it(tiny_vlm):
    (features, _) = clips(tiny_vlm)
    queries = [VideoQuery(features=features, question=q) for q in QUESTIONS]
    seen = []
    hook = tiny_vlm.network.model.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape[:2])))
    try:
        batch, _ = run(tiny_vlm, queries, share=True, decode_cross_attention=False)
    finally:
        hook.remove()
    head_tokens, tail_tokens = int(batch.prefix.batch.valid.sum()), batch.valid.sum(1).tolist()
    assert head_tokens > 4 * tiny_vlm.config.tokens_per_frame // 4  # the video tokens are in the head
    assert len(tail_tokens) == 3 and max(tail_tokens) < head_tokens  # three short tails
    assert seen[0] == (1, head_tokens + sum(tail_tokens))  # one prefill, one row: the head once, then each tail
    assert set(seen[1:]) == {(3, 1)}  # then decode steps, one token for each of the three


def test_a_probability_only_question_does_not_decode_and_its_p_yes_is_the_models(tiny_vlm):
    (features, _) = clips(tiny_vlm)
    probability_only = VideoQuery(features=features, question=QUESTIONS[0], max_new_tokens=0)
    steps = []
    original = tiny_vlm.decoder.step.forward
    tiny_vlm.decoder.step.forward = lambda *args, **kwargs: steps.append(1) or original(*args, **kwargs)
    try:
        (alone,) = tiny_vlm.generate([probability_only], max_new_tokens=NEW_TOKENS)
        assert steps == [] and alone.token_ids == [] and alone.text == ""
        captioned, asked = tiny_vlm.generate(
            [VideoQuery(features=features, question=QUESTIONS[1], max_new_tokens=3), probability_only],
            max_new_tokens=NEW_TOKENS)
    finally:
        del tiny_vlm.decoder.step.forward
    # the batch stops at the longest budget (3 tokens: 2 steps after the prefill), not at NEW_TOKENS
    assert len(steps) == 2 and len(captioned.token_ids) <= 3 and asked.token_ids == []
    expected = tiny_vlm.yes_probability(VideoQuery(features=features, question=QUESTIONS[0]))
    assert alone.yes_probability == pytest.approx(expected, rel=1e-5)
    assert asked.yes_probability == pytest.approx(expected, rel=1e-5)


def test_a_negative_budget_is_one_clear_error(tiny_vlm):
    (features, _) = clips(tiny_vlm)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        tiny_vlm.generate([VideoQuery(features=features, question="What?", max_new_tokens=-1)])
