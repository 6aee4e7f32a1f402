"""Sliding windows and the pipeline config (no Ray needed)."""

from __future__ import annotations

import pickle

import pytest

from connectors.redis_schema import MAX_QUESTION_CHARS
from model.prompt import MAX_PROMPT_CHARS
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.window import (FrameGroups, FrameRef, SlidingWindow, expected_windows, frames_from_objects,
                             frames_per_object)


def push_all(windows: SlidingWindow, count: int) -> list:
    emitted = [windows.push(FrameRef(i, i * 0.25, 1000 + i * 0.25, ref=i)) for i in range(count)]
    return [w for w in emitted if w is not None]


@pytest.mark.parametrize("count", [64, 65, 80, 90, 100, 200])
def test_windows_of_64_every_16_with_a_tail(count):
    windows = SlidingWindow("s", 64, 16, live=False)
    emitted = push_all(windows, count)
    tail = windows.finish()
    all_windows = emitted + ([tail] if tail else [])
    assert len(all_windows) == expected_windows(count, 64, 16)
    assert [w.seq for w in all_windows] == list(range(len(all_windows)))
    for w in emitted:
        assert len(w.frames) == 64
        assert w.frames[-1].seq - w.frames[0].seq == 63
    assert emitted[0].frames[0].seq == 0 and emitted[0].end == 63 * 0.25
    for a, b in zip(emitted, emitted[1:]):
        assert b.frames[0].seq - a.frames[0].seq == 16
    assert all_windows[-1].frames[-1].seq == count - 1  # the tail is covered


def test_short_file_gives_one_window_and_nothing_before_full():
    windows = SlidingWindow("s", 64, 16, live=False)
    assert push_all(windows, 10) == []
    tail = windows.finish()
    assert tail is not None and len(tail.frames) == 10
    assert SlidingWindow("s", 64, 16, live=False).finish() is None


class ObjectStore:
    """Stands for the frame store in these plain-logic tests: a handle per stored group."""

    def __init__(self):
        self.objects, self.gets = {}, []

    def put(self, images):
        handle = f"obj{len(self.objects)}"
        self.objects[handle] = list(images)
        return handle

    def get(self, handles):
        self.gets.append(list(handles))
        return [self.objects[h] for h in handles]


@pytest.mark.parametrize("size,stride,count", [(16, 8, 101), (64, 16, 200), (16, 6, 77), (12, 12, 50), (16, 7, 40)])
def test_grouped_frames_give_the_same_windows_at_the_same_frame(size, stride, count):
    """Frames stored in groups of gcd(size, stride): each window comes at the frame that ends it
    (no window waits for a group to fill) and holds the same frames, the file's tail too."""
    store = ObjectStore()
    groups = FrameGroups(frames_per_object(size, stride), store.put)
    per_frame, grouped = SlidingWindow("s", size, stride, live=False), SlidingWindow("s", size, stride, live=False)
    for i in range(count):
        expected = per_frame.push(FrameRef(i, i * 0.25, 1000 + i * 0.25, ref=f"image{i}"))
        got = [w for w in map(grouped.push, groups.add(i, i * 0.25, 1000 + i * 0.25, f"image{i}")) if w is not None]
        assert [w.seq for w in got] == ([expected.seq] if expected else [])
        if expected:
            assert [f.seq for f in got[0].frames] == [f.seq for f in expected.frames]
            assert frames_from_objects(got[0].frames, store.get) == [f.ref for f in expected.frames]
    for ref in groups.flush():
        assert grouped.push(ref) is None  # a short last group never ends a window
    expected_tail, tail = per_frame.finish(), grouped.finish()
    assert (tail is None) == (expected_tail is None)
    if tail:
        assert frames_from_objects(tail.frames, store.get) == [f.ref for f in expected_tail.frames]
    assert len(store.objects) == -(-count // frames_per_object(size, stride))


def test_frames_from_objects_gets_each_object_once_in_order():
    store = ObjectStore()
    groups = FrameGroups(4, store.put)
    refs = [r for i in range(8) for r in groups.add(i, 0.0, 0.0, f"image{i}")]
    lone = FrameRef(99, 0.0, 0.0, "alone")  # a frame stored alone (index None)
    store.objects["alone"] = "image99"
    assert frames_from_objects(refs[2:7] + [lone], store.get) == [f"image{i}" for i in range(2, 7)] + ["image99"]
    assert store.gets == [["obj0", "obj1", "alone"]]
    assert frames_per_object(16, 8) == 8 and frames_per_object(64, 16) == 16 and frames_per_object(16, 7) == 1


def test_stride_larger_than_window_is_rejected():
    with pytest.raises(ValueError, match="stride 65 must be between 1 and the window size 64"):
        SlidingWindow("s", 64, 65, live=False)


def test_config_sources_precedence(tmp_path, monkeypatch):
    path = tmp_path / "slowfast.yaml"
    path.write_text("window: 32\nstride: 8\nfps: 2\nstreams:\n  - id: cam1\n    source: rtsp://cam/1\n")
    monkeypatch.setenv("SLOWFAST_STRIDE", "4")
    monkeypatch.setenv("SLOWFAST_GENERATION__MAX_NEW_TOKENS", "12")
    config = load_config(path, fps=8.0)
    assert (config.window, config.stride, config.fps) == (32, 4, 8.0)  # yaml < env < flags
    assert config.generation.max_new_tokens == 12
    assert config.streams[0].id == "cam1" and config.streams[0].caption_prompt


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"window": "big"}, r"window='big'"),
        ({"stride": 100, "window": 64}, r"stride=100: stride 100 is larger than the window 64"),
        ({"fps": -1}, r"fps=-1"),
        ({"streams": [{"id": "a b", "source": "x.mp4"}]}, r"streams.0.id='a b': invalid stream id"),
        ({"streams": [{"id": "a", "source": "x"}, {"id": "a", "source": "y"}]}, r"repeated: \['a'\]"),
        ({"streams": [{"id": "a", "source": "x", "colour": 1}]}, r"streams.0.colour"),
        ({"generation": {"top_p": 0}}, r"generation.top_p=0"),
        ({"streams": [{"id": "a", "source": "x", "standing_questions": [
            {"id": "q", "prompt": "anyone?", "trigger": {}}]}]}, r"exactly one of starts_with or p_yes_above"),
    ],
)
def test_bad_config_values_name_field_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("window: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_config(listing)


def test_config_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("window: [1,\n")
    with pytest.raises(ConfigError) as bad_yaml:
        load_config(broken)
    with pytest.raises(ConfigError) as many:
        load_config(None, window="big", stride=0, fps=-1, batch_size=0, history_len=1, workers=0, metrics_port=-1)
    for exc in (bad_yaml, many):
        assert "\n" not in str(exc.value), str(exc.value)
    assert str(many.value).endswith("; and 2 more")


def test_a_config_file_gives_a_plain_config_and_leaves_no_state(tmp_path):
    path = tmp_path / "slowfast.yaml"
    path.write_text("window: 32\nstride: 8\n")
    config = load_config(path, fps=8.0)
    assert type(config) is PipelineConfig and config.model_fields_set == {"window", "stride", "fps"}
    assert pickle.loads(pickle.dumps(config)) == config  # what Ray does to send it to actors
    assert load_config().window == 64  # the file belonged to that load only


def test_standing_questions_follow_the_id_rule_and_the_question_limit():
    def stream(**question):
        standing = [{"id": "q", "prompt": "anyone?"} | question]
        return {"streams": [{"id": "cam", "source": "x.mp4", "standing_questions": standing}]}

    with pytest.raises(ConfigError, match="invalid standing question id 'a b'"):
        load_config(None, **stream(id="a b"))
    assert load_config(None, **stream(prompt="x" * MAX_QUESTION_CHARS)).streams[0].standing_questions
    with pytest.raises(ConfigError, match=f"prompt=.*at most {MAX_QUESTION_CHARS} characters"):
        load_config(None, **stream(prompt="x" * (MAX_QUESTION_CHARS + 1)))
    with pytest.raises(ConfigError, match=f"caption_prompt=.*at most {MAX_QUESTION_CHARS} characters"):
        load_config(None, streams=[{"id": "cam", "source": "x.mp4", "caption_prompt": "x" * (MAX_QUESTION_CHARS + 1)}])
    assert MAX_QUESTION_CHARS <= MAX_PROMPT_CHARS  # the model takes every question the pipeline accepts
