"""Hybrid cross-attention, cached decoding, batching and feature reuse on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from model import ModelInputError, VideoQuery
from model import generation
from model.language import FAST_VISUAL, HybridDecoderLayer
from tests.support.random_model import random_frames

QUESTION = "Please describe this video in detail."


def prompt_batch(vlm, queries):
    return vlm._batch(queries, room_for_answer=32)


def logits_for(vlm, batch):
    return generation.prefill_logits(vlm.network, batch)


def test_cross_attention_is_live(tiny_vlm):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    batch = prompt_batch(tiny_vlm, [query])
    reference = logits_for(tiny_vlm, batch)

    changed = prompt_batch(tiny_vlm, [query])
    changed.slow.states = changed.slow.states + torch.randn_like(changed.slow.states)
    assert not torch.allclose(logits_for(tiny_vlm, changed), reference, atol=1e-4)


def test_zero_warm_up_gates_switch_the_cross_term_off(tiny_vlm):
    gated = copy.deepcopy(tiny_vlm)
    with torch.no_grad():
        for layer in gated.network.model.layers:
            if isinstance(layer, HybridDecoderLayer):
                layer.self_attn.cross_attn_warm_up_gate.zero_()
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    reference = logits_for(gated, prompt_batch(gated, [query]))
    changed = prompt_batch(gated, [query])
    changed.slow.states = torch.randn_like(changed.slow.states)
    torch.testing.assert_close(logits_for(gated, changed), reference, rtol=0, atol=0)


def test_fast_visual_tokens_are_untouched_by_the_cross_term(tiny_vlm):
    """Output of the first hybrid layer: visual positions equal with any slow tokens, text positions differ."""
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    first_hybrid = next(l for l in tiny_vlm.network.model.layers if isinstance(l, HybridDecoderLayer))
    captured = []
    hook = first_hybrid.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        batch_a = prompt_batch(tiny_vlm, [query])
        logits_for(tiny_vlm, batch_a)
        batch_b = prompt_batch(tiny_vlm, [query])
        batch_b.slow.states = torch.randn_like(batch_b.slow.states)
        logits_for(tiny_vlm, batch_b)
    finally:
        hook.remove()
    visual = batch_a.token_types[0] == FAST_VISUAL
    torch.testing.assert_close(captured[0][0, visual], captured[1][0, visual], rtol=0, atol=0)
    assert not torch.allclose(captured[0][0, ~visual], captured[1][0, ~visual])


@pytest.mark.parametrize("decode_cross_attention", [False, True])
def test_cached_generation_equals_uncached_recomputation(tiny_vlm, decode_cross_attention):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    settings = generation.SamplingSettings(max_new_tokens=8, decode_cross_attention=decode_cross_attention)
    (cached,) = generation.generate(tiny_vlm.network, prompt_batch(tiny_vlm, [query]), settings, stop_token_ids=[])
    response = torch.tensor([cached.token_ids])
    logits = generation.logits_without_cache(
        tiny_vlm.network, prompt_batch(tiny_vlm, [query]), response, decode_cross_attention
    )
    assert logits[0, :-1].argmax(-1).tolist() == cached.token_ids


def test_decode_cross_attention_option_changes_decode_steps_only(tiny_vlm):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    response = torch.tensor([[5, 6, 7, 8]])
    official = generation.logits_without_cache(tiny_vlm.network, prompt_batch(tiny_vlm, [query]), response, False)
    training = generation.logits_without_cache(tiny_vlm.network, prompt_batch(tiny_vlm, [query]), response, True)
    torch.testing.assert_close(official[0, 0], training[0, 0])  # the first answer token comes from the prompt
    assert not torch.allclose(official[0, 1:], training[0, 1:], atol=1e-4)


def test_batch_of_two_different_lengths_equals_single_calls(tiny_vlm):
    short = VideoQuery(frames=random_frames(8, seed=1), question="What is there?")
    long = VideoQuery(frames=random_frames(16, seed=2), question="Please describe this video in great detail, step by step.")
    batched = tiny_vlm.generate([short, long], max_new_tokens=8)
    single = [tiny_vlm.generate([q], max_new_tokens=8)[0] for q in (short, long)]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]


def test_generate_from_features_equals_generate_from_frames(tiny_vlm):
    frames = random_frames(16, seed=3)
    features = tiny_vlm.encode_frames(tiny_vlm.preprocess(frames))
    from_features = tiny_vlm.generate([VideoQuery(features=features, question=QUESTION)], max_new_tokens=8)
    from_frames = tiny_vlm.generate([VideoQuery(frames=frames, question=QUESTION)], max_new_tokens=8)
    assert from_features == from_frames


def test_frame_features_do_not_depend_on_the_window(tiny_vlm):
    frames = random_frames(12, seed=4)
    window = tiny_vlm.encode_frames(tiny_vlm.preprocess(frames))
    alone = tiny_vlm.encode_frames(tiny_vlm.preprocess(frames[5:6]))
    torch.testing.assert_close(alone[0], window[5], rtol=1e-5, atol=1e-5)
    sliding = tiny_vlm.encode_frames(tiny_vlm.preprocess(frames[4:12]))
    torch.testing.assert_close(sliding, window[4:12], rtol=1e-5, atol=1e-5)


def test_next_token_logits_match_the_first_generated_token(tiny_vlm):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    logits = tiny_vlm.next_token_logits(query)
    assert logits.dtype == torch.float32 and logits.shape == (tiny_vlm.config.vocab_size,)
    first = generation.generate(
        tiny_vlm.network, prompt_batch(tiny_vlm, [query]), generation.SamplingSettings(max_new_tokens=1), []
    )[0].token_ids[0]
    assert int(logits.argmax()) == first


def test_yes_probability_weighs_the_first_tokens_yes_against_no(tiny_vlm):
    """P(yes) / (P(yes) + P(no)) of the first answer token, "Yes" and "No" with or without a
    leading space, recomputed here from the logits; generate gives the same from its prefill."""
    query = VideoQuery(frames=random_frames(8), question="Is anyone there?")
    probs = tiny_vlm.next_token_logits(query).softmax(-1)

    def mass(word: str) -> float:
        ids = {tiny_vlm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (word, " " + word)}
        assert len(ids) == 2
        return float(probs[sorted(ids)].sum())

    expected = mass("Yes") / (mass("Yes") + mass("No"))
    assert abs(expected - 0.5) > 0.05  # this random model leans one way: swapped words would show
    assert tiny_vlm.yes_probability(query) == pytest.approx(expected, rel=1e-5)
    (generated,) = tiny_vlm.generate([query], max_new_tokens=2)
    assert generated.yes_probability == pytest.approx(expected, rel=1e-4)


def test_stop_token_ends_a_sequence(tiny_vlm):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    settings = generation.SamplingSettings(max_new_tokens=6)
    (free,) = generation.generate(tiny_vlm.network, prompt_batch(tiny_vlm, [query]), settings, [])
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop_at = free.token_ids[2]
    cut = free.token_ids.index(stop_at)
    (stopped,) = generation.generate(tiny_vlm.network, prompt_batch(tiny_vlm, [query]), settings, [stop_at])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:cut]


def test_sampling_is_seeded_and_settings_take_effect(tiny_vlm):
    query = VideoQuery(frames=random_frames(8), question=QUESTION)
    sample = lambda **kw: tiny_vlm.generate([query], max_new_tokens=12, **kw)[0].token_ids  # noqa: E731
    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)
    assert sample(temperature=1.0, seed=7) != sample(temperature=1.0, seed=8)
    greedy = sample()
    assert sample(temperature=1.0, top_p=1e-6, seed=3) == greedy  # top_p -> only the best token survives
    penalized = sample(repetition_penalty=5.0)
    assert len(set(penalized)) > len(set(greedy))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
    ],
)
def test_bad_generation_settings(tiny_vlm, kwargs, message):
    with pytest.raises(ModelInputError, match=message):
        tiny_vlm.generate([VideoQuery(frames=random_frames(2), question=QUESTION)], **kwargs)
