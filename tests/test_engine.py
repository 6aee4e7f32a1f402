"""The engine, window in to Redis out, without Ray: real Redis, the random tiny model, frames
from an in-memory store. The Ray shell adds only transport to this (tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import IngestState, Question, QuestionKind, SummaryKind
from model import Generation, SlowFastVLM, VideoQuery
from model.random_checkpoint import write_random_checkpoint
from pipeline.config import StreamConfig, load_config
from pipeline.engine import Engine, EarlierOutputs
from pipeline.messages import IngestReport
from pipeline.scheduler import Outcome
from pipeline.window import FrameRef, FramesLost, Window
from tests.support.model_faults import CountingModel
from tests.support.random_model import random_frames

WINDOW, STRIDE = 4, 2


class FrameStore:
    """Frames by seq; `gone` ones raise FramesLost, as the worker's object-store fetch does."""

    def __init__(self, images):
        self.images, self.gone = images, set()

    def fetch(self, refs):
        if any(f.seq in self.gone for f in refs):
            raise FramesLost("frames gone with their owner")
        return [self.images[f.seq] for f in refs]


def windows_of(stream: str, count: int, live: bool, seed: int = 0) -> tuple[list[Window], FrameStore]:
    images = random_frames(WINDOW + STRIDE * (count - 1), size=64, seed=seed)
    refs = [FrameRef(i, i / 4.0, 1.7e9 + i / 4.0, None) for i in range(len(images))]
    windows = [Window(stream, k, tuple(refs[k * STRIDE : k * STRIDE + WINDOW]), live=live) for k in range(count)]
    return windows, FrameStore(images)


def make_engine(vlm, redis_url, fetch, out_dir: Path, batch_size: int = 4) -> Engine:
    config = load_config(None, redis_url=redis_url, out_dir=out_dir, window=WINDOW, stride=STRIDE, fps=4.0,
                         batch_size=batch_size, generation={"max_new_tokens": 3})
    return Engine(config, vlm, Publisher(redis_url), fetch, model_name="tiny")


def run_all(engine: Engine) -> dict[int, Outcome]:
    """Step until idle; the outcome each window's token got."""
    outcomes = {}
    while (step := engine.step()) is not None:
        outcomes |= {r.token: r.outcome for r in step.resolutions}
    return outcomes


def test_a_file_window_goes_from_submit_to_redis_files_and_status(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("file", 3, live=False)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    question = {"id": "any", "prompt": "Is anything there?", "trigger": {"p_yes_above": 0.0}}
    engine.add_stream(StreamConfig(id="file", source="clip.mp4", standing_questions=[question]), run=1, live=False,
                      summary_every=0)
    for window in windows:
        assert engine.submit(window, window.seq) == []
    assert run_all(engine) == {0: Outcome.DONE, 1: Outcome.DONE, 2: Outcome.DONE}

    client = SlowFastClient(redis_url)
    captions = client.history("file")
    assert [c.window for c in captions] == [0, 1, 2] and all(c.text and c.run == 1 for c in captions)
    answers = client.answers("file")
    assert [a.window for a in answers] == [0, 1, 2] and all(a.probability is not None for a in answers)
    # P(yes) comes from the caption batch's own forward and equals the model's unbatched figure
    features = engine.runner.rings["file"].latest[1]
    expected = tiny_vlm.yes_probability(VideoQuery(features=features, question=question["prompt"]))
    assert answers[-1].probability == pytest.approx(expected, rel=1e-4)
    assert [e.window for e in client.events("file")] == [0, 1, 2]  # p_yes > 0 fires on every window
    lines = [json.loads(line) for line in (tmp_path / "file" / "captions.jsonl").read_text().splitlines()]
    assert [line["window"] for line in lines] == [0, 1, 2]
    assert client.frame_info("file").window == 2

    stats = engine.stats("file")
    assert (stats.windows_done, stats.frames_encoded) == (3, WINDOW + 2 * STRIDE)
    assert stats.ring_size == WINDOW  # frames that slid out are released
    engine.ingest_report("file", IngestReport(state=IngestState.LIVE, live=False, frames_in=8, frames_corrupt=2,
                                              windows_emitted=3))
    engine.publish_status("file")
    status = client.status("file")
    assert (status.windows_done, status.frames_in, status.frames_corrupt, status.frames_dropped) == (3, 8, 2, 0)


def test_a_batch_counts_windows_each_with_all_its_questions_in_one_model_call(tiny_vlm, redis_url, tmp_path):
    """Two windows, each with a caption and two standing questions (one answered by P(yes)
    alone): one generate call of six rows, two clip prefills; the probability-only answer reads
    Yes or No by its P(yes), which is the model's own for that question."""
    windows, store = windows_of("file", 2, live=False)
    model = CountingModel(tiny_vlm)
    engine = make_engine(model, redis_url, store.fetch, tmp_path, batch_size=2)
    questions = [{"id": "red", "prompt": "Is there a red circle?", "answer": "probability"},
                 {"id": "what", "prompt": "What moves?"}]
    engine.add_stream(StreamConfig(id="file", source="clip.mp4", standing_questions=questions), run=1, live=False,
                      summary_every=0)
    for window in windows:
        engine.submit(window, window.seq)
    assert run_all(engine) == {0: Outcome.DONE, 1: Outcome.DONE}
    assert model.calls == [["VideoQuery"] * 6]
    answers = {(a.window, a.question_id): a for a in SlowFastClient(redis_url).answers("file")}
    features = engine.runner.rings["file"].latest[1]  # window 1's
    expected = tiny_vlm.yes_probability(VideoQuery(features=features, question=questions[0]["prompt"]))
    red = answers[1, "red"]
    assert red.probability == pytest.approx(expected, rel=1e-4) and red.text == ("Yes" if expected >= 0.5 else "No")
    assert answers[1, "what"].probability is None and answers[1, "what"].text not in ("", "Yes", "No")


def test_shared_prefill_changes_no_output_against_each_task_alone(tiny_vlm, redis_url, tmp_path):
    """Four windows in one batch, each with its caption, a text question and a probability
    question with a trigger, all on one prefill per window: every caption, answer and event is
    what the model gives each task as a prompt of its own (a query alone, its own frames), the
    path before prompts shared their prefill."""
    windows, store = windows_of("file", 4, live=False, seed=3)
    caption_prompt = StreamConfig(id="file", source="clip.mp4").caption_prompt

    def alone(window: Window, question: str) -> Generation:
        frames = np.stack(store.fetch(window.frames))  # a fresh array: nothing shared with another query
        (generation,) = tiny_vlm.generate([VideoQuery(frames=frames, question=question)], max_new_tokens=3)
        return generation

    p_yes = [alone(w, "Is there a red circle?").yes_probability for w in windows]
    threshold = sorted(p_yes)[1] + (sorted(p_yes)[2] - sorted(p_yes)[1]) / 2  # two windows fire, two do not
    fired = [w for w, p in enumerate(p_yes) if p > threshold]
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path, batch_size=4)
    stream = StreamConfig(id="file", source="clip.mp4", standing_questions=[
        {"id": "what", "prompt": "What moves?"},
        {"id": "red", "prompt": "Is there a red circle?", "answer": "probability",
         "trigger": {"p_yes_above": threshold, "open_after": 1, "close_after": 1}},
    ])
    engine.add_stream(stream, run=1, live=False, summary_every=0)
    for window in windows:
        engine.submit(window, window.seq)
    assert run_all(engine) == dict.fromkeys(range(4), Outcome.DONE)

    client = SlowFastClient(redis_url)
    answers = {(a.window, a.question_id): a for a in client.answers("file")}
    for window, caption in zip(windows, client.history("file"), strict=True):
        assert caption.text == alone(window, caption_prompt).text
        assert answers[window.seq, "what"].text == alone(window, "What moves?").text
        assert answers[window.seq, "red"].probability == pytest.approx(p_yes[window.seq], abs=1e-4)
    events = client.events("file")
    assert [e.window for e in events if e.phase != "closed"] == fired  # opened or updated: each window that fires
    assert [e.window for e in events if e.phase == "opened"] == [w for w in fired if w - 1 not in fired]


def test_a_window_whose_frames_are_gone_is_rolled_back_and_one_missing_only_its_picture_is_published(
    tiny_vlm, redis_url, tmp_path
):
    (first, second), store = windows_of("file", 2, live=False, seed=3)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    engine.add_stream(StreamConfig(id="file", source="clip.mp4"), run=1, live=False, summary_every=0)
    client = SlowFastClient(redis_url)

    store.gone = {WINDOW + STRIDE - 1}  # the second window's newest frame: it cannot be encoded
    engine.submit(first, "first")
    engine.submit(second, "second")
    assert run_all(engine) == {"first": Outcome.DONE, "second": Outcome.RETRY}
    assert [c.window for c in client.history("file")] == [0]  # reported, never published
    assert engine.scheduler.next_seq("file") == 1  # the lane waits for the re-sent window
    assert engine.stats("file").frames_encoded == WINDOW

    store.gone = set()  # re-sent with its frames, encoded; then its last frame goes
    original_encode = tiny_vlm.encode_frames

    class GoneAfterEncoding:
        def __getattr__(self, name):
            return getattr(tiny_vlm, name)

        def encode_frames(self, pixels):
            store.gone = {WINDOW + STRIDE - 1}
            return original_encode(pixels)

    engine.runner.vlm = GoneAfterEncoding()
    engine.submit(second, "again")
    assert run_all(engine) == {"again": Outcome.DONE}
    assert [(c.window, c.error) for c in client.history("file")] == [(0, None), (1, None)]
    assert client.frame_info("file").window == 0  # the picture stays the previous window's


def test_a_window_the_model_fails_on_twice_is_published_as_failed_and_the_engine_goes_on(
    tiny_vlm, redis_url, tmp_path
):
    windows, store = windows_of("file", 2, live=False)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    engine.add_stream(StreamConfig(id="file", source="clip.mp4"), run=1, live=False, summary_every=0)

    class FailsOnWindowZero:  # window 0's frames hold the seed-0 images: fail while encoding them
        def __getattr__(self, name):
            return getattr(tiny_vlm, name)

        def encode_frames(self, pixels):
            if len(pixels) == WINDOW:
                raise RuntimeError("injected")
            return tiny_vlm.encode_frames(pixels)

    engine.runner.vlm = FailsOnWindowZero()
    engine.submit(windows[0], 0)
    assert run_all(engine) == {0: Outcome.FAILED}
    engine.runner.vlm = tiny_vlm
    engine.submit(windows[1], 1)
    assert run_all(engine) == {1: Outcome.DONE}
    captions = SlowFastClient(redis_url).history("file")
    assert [c.window for c in captions] == [0, 1]
    assert "failed after 2 attempts: RuntimeError: injected" in captions[0].error and not captions[0].text
    assert captions[1].error is None and captions[1].text
    lines = (tmp_path / "file" / "captions.jsonl").read_text().splitlines()
    assert "injected" in json.loads(lines[0])["error"]


def test_ad_hoc_questions_use_the_latest_window_and_say_why_when_they_cannot(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("cam", 2, live=True)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    engine.add_stream(StreamConfig(id="cam", source="rtsp://cam/1"), run=1, live=True, summary_every=0)

    def ask(stream, kind=QuestionKind.OPEN, text="Is it red?"):
        return engine.answer(Question(id="q1", stream=stream, text=text, kind=kind))

    assert ask("cam").error == "stream 'cam' has no window yet"
    assert ask("nowhere").error == "stream 'nowhere' is not running"
    assert engine.submit(windows[0], 0) == []
    (overtaken,) = engine.submit(windows[1], 1)  # newest wins: the waiting window is skipped
    assert (overtaken.token, overtaken.outcome) == (0, Outcome.SKIPPED)
    assert run_all(engine) == {1: Outcome.DONE}
    answer = ask("cam", QuestionKind.YESNO)
    assert answer.error is None and answer.window == 1 and 0.0 <= answer.probability <= 1.0
    assert ask("cam").probability is None


def test_resume_point_restarts_the_ring_and_a_removed_streams_windows_resolve_removed(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("file", 3, live=False)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    assert engine.resume_point("file") is None  # not this engine's stream (yet)
    engine.add_stream(StreamConfig(id="file", source="clip.mp4"), run=2, live=False, summary_every=0, next_window=1)
    assert engine.resume_point("file") == 1
    engine.submit(windows[1], 1)
    engine.submit(windows[2], 2)
    assert [(r.token, r.outcome) for r in engine.remove_stream("file")] == [(1, Outcome.REMOVED), (2, Outcome.REMOVED)]
    assert engine.step() is None and engine.stats("file") is None


def test_a_files_final_summary_follows_its_last_window_and_lands_in_summary_md(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("file", 3, live=False)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path, batch_size=2)
    engine.add_stream(StreamConfig(id="file", source="clip.mp4"), run=1, live=False, summary_every=2)
    for window in windows:
        engine.submit(window, window.seq)
    run_all(engine)
    engine.ingest_report("file", IngestReport(state=IngestState.ENDED, live=False, final=True))
    assert not engine.idle
    run_all(engine)
    assert engine.idle
    summaries = SlowFastClient(redis_url).summaries("file")
    # windows 0-1 fill the first batch; the summary of them rides with window 2; at the end, the
    # captions left get theirs, then the whole file one
    kinds = [(s.kind, s.first_window, s.last_window) for s in summaries]
    assert kinds == [(SummaryKind.ROLLING, 0, 1), (SummaryKind.ROLLING, 2, 2), (SummaryKind.FINAL, 0, 2)]
    assert (tmp_path / "file" / "summary.md").read_text().startswith("# Summary of file")


def test_a_resumed_stream_keeps_its_earlier_captions_in_its_files(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("file", 3, live=False)
    first = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    first.add_stream(StreamConfig(id="file", source="clip.mp4"), run=1, live=False, summary_every=0)
    first.submit(windows[0], 0)
    run_all(first)
    earlier = EarlierOutputs(captions=SlowFastClient(redis_url).history("file"))
    second = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    second.add_stream(StreamConfig(id="file", source="clip.mp4"), run=1, live=False, summary_every=0,
                      next_window=1, earlier=earlier)
    second.submit(windows[1], 1)
    assert run_all(second) == {1: Outcome.DONE}
    lines = [json.loads(line)["window"] for line in (tmp_path / "file" / "captions.jsonl").read_text().splitlines()]
    assert lines == [0, 1]


def test_unchanged_windows_repeat_the_last_caption_and_answers_without_the_model(tiny_vlm, redis_url, tmp_path):
    windows, store = windows_of("cam", 4, live=True)
    model = CountingModel(tiny_vlm)
    engine = make_engine(model, redis_url, store.fetch, tmp_path)
    question = {"id": "red", "prompt": "Is there a red circle?", "answer": "probability"}
    engine.add_stream(StreamConfig(id="cam", source="rtsp://cam/1", standing_questions=[question]), run=1, live=True,
                      summary_every=0)
    gated = [replace(w, gated=w.seq > 0) for w in windows]  # the first window always reaches the model
    for window in gated[:2]:
        engine.submit(window, window.seq)
        run_all(engine)
    assert len(model.calls) == 1  # the gated window cost no model call
    client = SlowFastClient(redis_url)
    first, second = client.history("cam")
    assert second.text == first.text and second.unchanged_since_window == 0
    assert second.unchanged_since == first.wall_end and first.unchanged_since_window is None
    answers = client.answers("cam")
    assert [(a.window, a.text, a.probability) for a in answers][1] == (1, answers[0].text, answers[0].probability)
    assert engine.stats("cam").windows_gated == 1 and engine.stats("cam").frames_encoded == WINDOW
    engine.submit(gated[2], 2)
    run_all(engine)
    assert client.history("cam")[-1].unchanged_since_window == 0  # still dates from the model's window


@pytest.mark.parametrize("answers, open_after, close_after, expected", [
    ("YNYYNNY", 1, 2, [(0, "opened"), (2, "updated"), (3, "updated"), (5, "closed"), (6, "opened")]),
    ("YNYYNNY", 2, 1, [(3, "opened"), (4, "closed")]),
])
def test_a_flickering_trigger_makes_one_event_with_a_start_updates_and_an_end(
    tiny_vlm, redis_url, tmp_path, answers, open_after, close_after, expected
):
    """The model runs on every window; its answer to the question is then replaced by a script
    (Y: "yes", N: "no") so the test chooses which windows fire a `starts_with: yes` trigger."""
    windows, store = windows_of("file", len(answers), live=False)
    engine = make_engine(tiny_vlm, redis_url, store.fetch, tmp_path)
    trigger = {"starts_with": "yes", "open_after": open_after, "close_after": close_after}
    engine.add_stream(StreamConfig(id="file", source="clip.mp4", standing_questions=[
        {"id": "q", "prompt": "Is it there?", "trigger": trigger}]), run=1, live=False, summary_every=0)
    say = iter(answers)
    original = engine.runner._generate

    def scripted(queries):  # the model runs; the answer's text is replaced by the script's
        replies = original(queries)
        return [replace(r, text="yes" if q.question == "Is it there?" and next(say) == "Y" else "no")
                if q.question == "Is it there?" else r for q, r in zip(queries, replies)]

    engine.runner._generate = scripted
    for window in windows:
        engine.submit(window, window.seq)
        run_all(engine)
    trigger_records = [(e.window, str(e.phase)) for e in SlowFastClient(redis_url).events("file")]
    assert trigger_records == expected
    events = SlowFastClient(redis_url).events("file")
    assert len({e.event_id for e in events if e.first_window == expected[0][0]}) == 1
    opened = SlowFastClient(redis_url).open_events("file")
    assert [e.event_id for e in opened] == ([events[-1].event_id] if expected[-1][1] == "opened" else [])


def ask_in_background(engine: Engine, question: Question) -> tuple[threading.Thread, dict]:
    """`engine.answer` in a thread, as the worker calls it beside its step loop."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(answer=engine.answer(question)))
    thread.start()
    return thread, result


def wait_for_rider(engine: Engine, stream: str) -> None:
    deadline = time.monotonic() + 30
    while not engine.riders.get(stream):
        assert time.monotonic() < deadline, "the question never waited for the window"
        time.sleep(0.01)


def test_an_ad_hoc_question_rides_its_streams_waiting_window_on_that_windows_prefill(tiny_vlm, redis_url, tmp_path):
    """Asked while window 1 waits for the model: the question joins its batch (one model call:
    caption and question on one prefill), and its answer is what the model gives it alone on
    window 1's features, text and P(yes)."""
    windows, store = windows_of("cam", 2, live=True, seed=5)
    model = CountingModel(tiny_vlm)
    engine = make_engine(model, redis_url, store.fetch, tmp_path)
    engine.add_stream(StreamConfig(id="cam", source="rtsp://cam/1"), run=1, live=True, summary_every=0)
    engine.submit(windows[0], 0)
    run_all(engine)
    engine.submit(windows[1], 1)
    model.calls.clear()
    thread, result = ask_in_background(engine, Question(id="q1", stream="cam", text="Is it red?", kind=QuestionKind.YESNO))
    wait_for_rider(engine, "cam")
    assert run_all(engine) == {1: Outcome.DONE}
    thread.join(timeout=60)
    assert model.calls == [["VideoQuery", "VideoQuery"]]  # the caption and the question, one call
    answer = result["answer"]
    features = engine.runner.rings["cam"].latest[1]  # window 1's
    (alone,) = tiny_vlm.generate([VideoQuery(features=features, question="Is it red?")], max_new_tokens=3)
    assert (answer.error, answer.window, answer.text) == (None, 1, alone.text)
    assert answer.probability == pytest.approx(alone.yes_probability, rel=1e-4)


def test_a_riding_question_the_model_refuses_gets_its_error_and_the_window_its_caption(tmp_path_factory, redis_url, tmp_path):
    """A question too long for the model's context, asked while a window waits: the window is
    captioned as if it had not been asked, and the question gets the model's refusal."""
    vlm = SlowFastVLM.from_pretrained(write_random_checkpoint(
        tmp_path_factory.mktemp("short-context"), seed=0, max_position_embeddings=600,
        tokenizer_model_max_length=600), device="cpu")
    windows, store = windows_of("cam", 2, live=True, seed=5)
    engine = make_engine(vlm, redis_url, store.fetch, tmp_path)
    engine.add_stream(StreamConfig(id="cam", source="rtsp://cam/1"), run=1, live=True, summary_every=0)
    engine.submit(windows[0], 0)
    run_all(engine)
    engine.submit(windows[1], 1)
    thread, result = ask_in_background(engine, Question(id="q1", stream="cam", text="Is it red? " * 170))
    wait_for_rider(engine, "cam")
    step = engine.step()  # the window is done by this one step, not failed and retried
    assert {r.token: r.outcome for r in step.resolutions} == {1: Outcome.DONE}
    thread.join(timeout=60)
    assert result["answer"].error.startswith("prompt is ") and result["answer"].window == 1
    assert [c.window for c in SlowFastClient(redis_url).history("cam") if c.error is None and c.text] == [0, 1]
