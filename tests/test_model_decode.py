"""The static-cache decode: compiled whole on CPU, equal to the eager step, bf16, fallback."""

from __future__ import annotations

import logging

import pytest
import torch

from model import SlowFastVLM, VideoQuery
from model import generation

NEW_TOKENS = 6


def feature_queries(vlm, frame_counts=(2, 4)):
    """Queries from random per-frame features (skips the tower: the decode is under test)."""
    g = torch.Generator().manual_seed(0)
    shape = (vlm.config.tokens_per_frame, vlm.config.hidden_size)
    questions = ["What?", "Please describe this video in detail.", "What moves?"]
    return [VideoQuery(features=torch.randn(n, *shape, generator=g), question=q) for n, q in zip(frame_counts, questions)]


# Dynamo's tracing, where a graph break or host sync would show, is the same whatever the
# backend; "eager" runs the captured graph as is, so the test costs seconds instead of
# minutes of inductor's C++ builds on CPU.
TRACE_ONLY = "eager"


@torch.inference_mode()
def step_logits(decoder, vlm, queries, decode_cross_attention):
    """Prefill, then one decode step eagerly and one through `decoder`'s step, on equal copies."""
    settings = generation.SamplingSettings(max_new_tokens=1, decode_cross_attention=decode_cross_attention)
    batch = vlm._batch(queries, room_for_answer=NEW_TOKENS)
    decoder.generate(batch, settings, [])  # fills the static cache with the prompt
    ((rows, slots), buffers), = decoder._buffers.items()
    slow = decoder._slow_context(batch.slow, batch.has_visual, rows) if decode_cross_attention else None
    tokens = torch.arange(rows) + 5
    positions = torch.zeros(rows, 1, dtype=torch.long)
    positions[: len(queries), 0] = batch.lengths
    slot = torch.tensor([batch.valid.shape[1]])

    def run(step):
        copy = generation.DecodeBuffers([k.clone() for k in buffers.keys], [v.clone() for v in buffers.values],
                                        buffers.key_valid.clone())
        return step(tokens, positions, slot, copy, slow)[: len(queries)]

    return run(decoder.step), run(decoder.compiled_step)


@pytest.mark.parametrize("decode_cross_attention", [False, True])
def test_compiled_decode_step_has_no_graph_break_and_equals_eager(tiny_vlm, decode_cross_attention):
    queries = feature_queries(tiny_vlm)
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS, decode_cross_attention=decode_cross_attention)
    eager = generation.Decoder(tiny_vlm.network).generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [])

    compiled = generation.Decoder(tiny_vlm.network, compile=True, backend=TRACE_ONLY)
    static = compiled.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [])
    assert compiled.compiled, "the decode step fell back to eager: fullgraph compilation failed"
    assert [s.token_ids for s in static] == [e.token_ids for e in eager]
    assert all(len(s.token_ids) == NEW_TOKENS for s in static)

    eager_logits, compiled_logits = step_logits(compiled, tiny_vlm, queries, decode_cross_attention)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_batch_padding_rows_do_not_change_the_answers(tiny_vlm):
    """Three rows padded to four (the compiled path's bucket) give what single calls give."""
    queries = feature_queries(tiny_vlm, (2, 4)) + feature_queries(tiny_vlm, (3,))
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS)
    decoder = generation.Decoder(tiny_vlm.network, compile=True, backend=TRACE_ONLY)
    batched = decoder.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [])
    assert list(decoder._buffers)[0][0] == 4
    single = [generation.generate(tiny_vlm.network, tiny_vlm._batch([q], NEW_TOKENS), settings, [])[0] for q in queries]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]


def test_the_decoder_keeps_the_buffers_of_the_sizes_it_used_last_and_decodes_the_same(tiny_vlm):
    """Each batch size used to keep its cache buffers for good, and a long run meets many sizes:
    only the KEPT_SIZES used last stay, and a size met again after its buffers went decodes as
    it did the first time, and as a fresh decoder does."""
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS, decode_cross_attention=True)
    decoder = generation.Decoder(tiny_vlm.network)
    most = decoder.KEPT_SIZES

    def decode(decoder, rows: int) -> list[list[int]]:
        queries = (feature_queries(tiny_vlm, (2, 4, 3)) * rows)[:rows]
        return [a.token_ids for a in decoder.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [])]

    first = {rows: decode(decoder, rows) for rows in range(1, most + 4)}
    for kept in (decoder._buffers, decoder._slow_buffers):
        assert len(kept) <= most and (most + 3) in {rows for rows, _ in kept}
        assert 1 not in {rows for rows, _ in kept}  # the least recently used went
    assert decode(decoder, 1) == first[1] == decode(generation.Decoder(tiny_vlm.network), 1)
    assert 1 in {rows for rows, _ in decoder._buffers} and len(decoder._buffers) <= most


def test_compiler_failure_falls_back_to_eager_with_a_warning(tiny_vlm, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    queries = feature_queries(tiny_vlm)
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS)
    decoder = generation.Decoder(tiny_vlm.network, compile=True, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="model.compiled"):
        answers = decoder.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [])
    assert not decoder.compiled
    assert any("compiled decode step failed, using eager" in r.message for r in caplog.records)
    eager = generation.generate(tiny_vlm.network, tiny_vlm._batch(queries, NEW_TOKENS), settings, [])
    assert [a.token_ids for a in answers] == [e.token_ids for e in eager]


def test_a_batch_that_has_finished_stops_stepping(tiny_vlm):
    """Every row meets a stop token early (row 0 at once, row 1 after 9+ tokens): decoding
    stops within STOP_CHECK_EVERY steps of the last row's stop, far short of the budget."""
    budget = 24
    queries = feature_queries(tiny_vlm)
    settings = generation.SamplingSettings(max_new_tokens=budget)
    decoder = generation.Decoder(tiny_vlm.network)
    first, second = (f.token_ids for f in decoder.generate(tiny_vlm._batch(queries, budget), settings, []))
    late = next(t for i, t in enumerate(second) if i >= 9 and t not in second[:i] and t != first[0])
    stops = [first[0], late]
    cuts = [min(ids.index(s) for s in stops if s in ids) for ids in (first, second)]
    done_at = max(cuts)
    assert cuts[0] == 0 and done_at + decoder.STOP_CHECK_EVERY < budget - 1  # the test's own premise
    steps = []
    decoder.step.register_forward_hook(lambda *_: steps.append(1))
    stopped = decoder.generate(tiny_vlm._batch(queries, budget), settings, stops)
    assert [s.finish_reason for s in stopped] == ["stop", "stop"]
    assert [s.token_ids for s in stopped] == [first[: cuts[0]], second[: cuts[1]]]
    assert done_at <= len(steps) < done_at + decoder.STOP_CHECK_EVERY


@pytest.mark.parametrize("decode_cross_attention", [False, True])
def test_rows_with_nothing_to_decode_leave_the_batch_after_the_prefill(tiny_vlm, decode_cross_attention):
    """Two clips, each with a question to answer in words and two scored only (budget 0): the
    decode steps run over the two answering rows alone, and every row's tokens and scores are
    those of the same batch decoding all its rows."""
    first, second = feature_queries(tiny_vlm, (2, 4))
    scored = [VideoQuery(features=q.features, question=text, max_new_tokens=0)
              for q in (first, second) for text in ("Is it red?", "Is anything moving?")]
    queries = [scored[0], first, scored[1], scored[2], second, scored[3]]
    rows_stepped = []
    hook = tiny_vlm.decoder.step.register_forward_hook(lambda _module, args, _out: rows_stepped.append(args[0].shape[0]))
    try:
        mixed = tiny_vlm.generate(queries, max_new_tokens=NEW_TOKENS, decode_cross_attention=decode_cross_attention)
    finally:
        hook.remove()
    assert set(rows_stepped) == {2}
    decoding_all = tiny_vlm.generate([VideoQuery(features=q.features, question=q.question) for q in queries],
                                     max_new_tokens=NEW_TOKENS, decode_cross_attention=decode_cross_attention)
    for index, (row, reference) in enumerate(zip(mixed, decoding_all)):
        assert row.yes_probability == pytest.approx(reference.yes_probability, rel=1e-5)
        expected = [] if queries[index].max_new_tokens == 0 else reference.token_ids
        assert row.token_ids == expected


@torch.inference_mode()
def test_decoding_rows_copied_within_the_prefills_bucket_decode_as_every_row_would(tiny_vlm):
    """Compiled: three clips pack into 3 prefill rows (padded to 4); the 4 prompts that decode
    (two on the first clip) are copied out of those rows into the same bucket, so each copy is
    read before any is written. Their tokens are those of decoding every prompt."""
    first, second, third = feature_queries(tiny_vlm, (2, 4, 3))
    queries = [first, VideoQuery(features=first.features, question="Is it red?", max_new_tokens=0),
               VideoQuery(features=first.features, question="Is it blue?"), second, third]
    decoder = generation.Decoder(tiny_vlm.network, compile=True, backend=TRACE_ONLY)
    settings = generation.SamplingSettings(max_new_tokens=NEW_TOKENS)
    budgets = [NEW_TOKENS, 0, NEW_TOKENS, NEW_TOKENS, NEW_TOKENS]
    mixed = decoder.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [], budgets)
    assert decoder.compiled and list(decoder._buffers) == [(4, next(iter(decoder._buffers))[1])]
    every_row = decoder.generate(tiny_vlm._batch(queries, NEW_TOKENS), settings, [], [NEW_TOKENS] * 5)
    assert [row.token_ids for row in mixed] == [r.token_ids if b else [] for r, b in zip(every_row, budgets)]


def test_bf16_on_cpu(tiny_model_dir, tiny_vlm):
    """The 64-frame path (temporal group pooling) and generation run in bf16 on CPU."""
    bf16 = SlowFastVLM.from_pretrained(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, tiny_vlm.config.tokens_per_frame, tiny_vlm.config.hidden_size, generator=g)
    query = VideoQuery(features=features, question="Please describe this video in detail.")
    (answer,) = bf16.generate([query], max_new_tokens=4)
    assert len(answer.token_ids) == 4 or answer.finish_reason == "stop"
    assert bf16.visual_tokens(query).fast.shape == (16 * tiny_vlm.config.tokens_per_frame, tiny_vlm.config.hidden_size)
    reference = tiny_vlm.next_token_logits(query)
    torch.testing.assert_close(bf16.next_token_logits(query), reference, rtol=0.05, atol=0.15)


def test_too_old_libraries_are_named_at_import_and_match_pyproject():
    import tomllib
    from pathlib import Path

    import model

    with pytest.raises(ImportError, match=r"needs transformers>=5\.\d+, found transformers 4\.57\.1: pip install -U"):
        model.check_versions({"transformers": "4.57.1"})
    model.check_versions({"torch": "2.13.0+cu128", "transformers": model.MIN_VERSIONS["transformers"]})
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = {d.split(">=")[0]: d.split(">=")[1].split(",")[0] for d in pyproject["project"]["dependencies"]}
    assert {p: declared[p] for p in model.MIN_VERSIONS} == model.MIN_VERSIONS
