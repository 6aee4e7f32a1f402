"""Rolling summaries ride in the free slots of caption batches (no Ray; real Redis, tiny model).

The worker's skip rule for live windows (newest wins) depends only on which windows a batch
takes and how many model calls it makes; these tests pin both, deterministically, with and
without summaries.
"""

from __future__ import annotations

import pytest

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import SummaryKind
from pipeline.config import StreamConfig, load_config
from pipeline.engine import Engine
from pipeline.window import FrameRef, Window
from tests.support.model_faults import CountingModel
from tests.support.random_model import random_frames

WINDOW, STRIDE = 4, 2
STREAMS = ("cam-a", "cam-b")


def windows_of(stream: str, count: int, seed: int) -> list[Window]:
    images = random_frames(WINDOW + STRIDE * (count - 1), size=64, seed=seed)
    refs = [FrameRef(i, i / 4.0, 1.7e9 + i / 4.0, images[i]) for i in range(len(images))]
    return [Window(stream, k, tuple(refs[k * STRIDE : k * STRIDE + WINDOW]), live=True) for k in range(count)]


def run_batches(tiny_vlm, redis_url, batch_size: int, summary_every: int, rounds: int = 4):
    model = CountingModel(tiny_vlm)
    config = load_config(None, redis_url=redis_url, window=WINDOW, stride=STRIDE, batch_size=batch_size,
                         generation={"max_new_tokens": 3})
    engine = Engine(config, model, Publisher(redis_url), fetch_frames=lambda refs: [f.ref for f in refs],
                    model_name="tiny")
    for sid in STREAMS:
        engine.add_stream(StreamConfig(id=sid, source=f"rtsp://cam/{sid}"), run=1, live=True,
                          summary_every=summary_every)
    windows = {sid: windows_of(sid, rounds, seed) for seed, sid in enumerate(STREAMS)}
    captioned = []
    for k in range(rounds):  # each batch: the newest window of every camera, as the worker takes them
        for sid in STREAMS:
            engine.submit(windows[sid][k], (sid, k))
        step = engine.step()
        captioned += [r.token for r in step.resolutions]
        assert engine.step() is None
    return engine, model.calls, captioned


@pytest.mark.parametrize("batch_size", [2, 3])
def test_summaries_never_take_a_windows_place_or_add_a_model_call(tiny_vlm, redis_url, batch_size):
    _, plain_calls, plain = run_batches(tiny_vlm, redis_url, batch_size, summary_every=0)
    engine, calls, captioned = run_batches(tiny_vlm, redis_url, batch_size, summary_every=1)
    assert captioned == plain  # the same windows, captioned in the same batches
    assert len(calls) == len(plain_calls)  # summaries join the caption call, never one of their own
    assert all(call.count("VideoQuery") == 2 and len(call) <= batch_size for call in calls)
    states = [engine.outputs.streams[sid].summaries for sid in STREAMS]
    client = SlowFastClient(redis_url)
    if batch_size == 2:  # full batches: every due summary is skipped and counted, captions roll over
        assert all(call == ["VideoQuery", "VideoQuery"] for call in calls)
        assert [s.skipped for s in states] == [3, 3] and not any(s.done for s in states)
        assert [len(s.pending) for s in states] == [4, 4]
    else:  # one free slot per batch: the summaries take turns in it
        assert all(call == ["VideoQuery", "VideoQuery", "TextQuery"] for call in calls[1:])
        summaries = [s for sid in STREAMS for s in client.summaries(sid)]
        assert len(summaries) == 3 and all(s.kind == SummaryKind.ROLLING for s in summaries)
        for state in states:  # each summary covers exactly the windows since the one before
            covered = [w for s in state.done for w in range(s.first_window, s.last_window + 1)]
            assert covered == list(range(len(covered)))
