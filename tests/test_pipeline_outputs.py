"""captions.jsonl / captions.vtt of file streams, the VTT read back by FFmpeg's WebVTT demuxer."""

from __future__ import annotations

import json

import pytest

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from pipeline.config import load_config
from pipeline.outputs import CaptionFiles
from pipeline.resume import earlier_outputs
from tests.support.media import read_vtt_cues
from tests.support.records import RUN, make_caption

FPS = 4.0
DT = 1 / FPS


def window_caption(index: int, start: float, frames: int = 16):
    return make_caption(index, stream="clip", start=start, end=start + (frames - 1) * DT, text=f"w{index}")


def test_vtt_plays_one_caption_at_a_time_and_jsonl_keeps_window_ranges(tmp_path):
    # window 16, stride 8 at 4 fps; the last window is the file's tail, 5 frames after the one before.
    captions = [window_caption(i, i * 2.0) for i in range(4)] + [window_caption(4, 7.25)]
    files = CaptionFiles(tmp_path, DT)
    for caption in captions:
        files.write(caption)
    files.close()

    cues = read_vtt_cues(tmp_path / "captions.vtt")
    assert [text for *_, text in cues] == ["w0", "w1", "w2", "w3", "w4"]
    assert cues[0][:2] == (0.0, 4.0)  # the first cue covers the whole first window
    for (_, prev_end, _), (start, end, _), caption in zip(cues, cues[1:], captions[1:]):
        assert start == pytest.approx(prev_end)  # contiguous: no overlap, no gap
        assert end == pytest.approx(caption.end + DT)  # until its window's last frame has shown
        assert end > start
    assert [c[:2] for c in cues[1:4]] == [(4.0, 6.0), (6.0, 8.0), (8.0, 10.0)]  # the last `stride` frames
    assert cues[4][:2] == (10.0, 11.25)

    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [(r["window"], r["start"], r["end"]) for r in records] == [(c.window, c.start, c.end) for c in captions]


def test_vtt_continues_contiguously_after_a_restart(tmp_path):
    first = CaptionFiles(tmp_path, DT)
    first.write(window_caption(0, 0.0))
    first.close()
    # A worker restarted mid-file, or a resumed run, rewrites the files from what Redis holds
    # (here window 0, whose first file was cut mid-line), then goes on.
    (tmp_path / "captions.jsonl").write_text((tmp_path / "captions.jsonl").read_text() + '{"window": 1, "sta')
    second = CaptionFiles(tmp_path, DT, earlier=[window_caption(0, 0.0)])
    second.write(window_caption(1, 2.0))
    second.close()
    cues = read_vtt_cues(tmp_path / "captions.vtt")
    assert [c[:2] for c in cues] == [(0.0, 4.0), (4.0, 6.0)]
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["window"] for r in records] == [0, 1]


def test_a_failed_window_shows_nothing_for_its_stretch(tmp_path):
    files = CaptionFiles(tmp_path, DT)
    files.write(window_caption(0, 0.0))
    files.write(window_caption(1, 2.0).model_copy(update={"text": "", "error": "model failed: CUDA OOM"}))
    files.write(window_caption(2, 4.0))
    files.close()
    assert [c[:2] for c in read_vtt_cues(tmp_path / "captions.vtt")] == [(0.0, 4.0), (6.0, 8.0)]
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r.get("error") for r in records] == [None, "model failed: CUDA OOM", None]


def test_a_restart_keeps_the_windows_redis_no_longer_holds_from_the_files_own_lines(tmp_path):
    """Redis keeps only the last `history_len` captions: a worker restarted late in a long file
    gets the last few from Redis, and the windows before them stay as the file had them."""
    captions = [window_caption(w, 2.0 * w) for w in range(7)]
    first = CaptionFiles(tmp_path / "restarted", DT)
    for caption in captions[:6]:
        first.write(caption)
    first.close()
    jsonl = tmp_path / "restarted" / "captions.jsonl"
    jsonl.write_text(jsonl.read_text() + '{"window": 6, "sta')  # killed mid-line
    second = CaptionFiles(tmp_path / "restarted", DT, earlier=captions[3:6])  # what Redis still holds
    second.write(captions[6])
    second.close()
    reference = CaptionFiles(tmp_path / "whole", DT)  # one writer from start to end
    for caption in captions:
        reference.write(caption)
    reference.close()
    for name in ("captions.jsonl", "captions.vtt"):
        assert (tmp_path / "restarted" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert [json.loads(line)["window"] for line in jsonl.read_text().splitlines()] == list(range(7))


def test_a_restarted_worker_gets_every_caption_of_the_run_that_redis_holds(redis_url, tmp_path):
    """Redis trims approximately, so it may hold more than `history_len` captions, and the newest
    are what a killed worker's files may lack (their last lines not yet written): a soak lost
    the 5 windows before a kill when the restart took the first `history_len` of them."""
    config = load_config(None, redis_url=redis_url, out_dir=tmp_path, history_len=12)
    with Publisher(redis_url, history_len=config.history_len) as publisher:
        for window in range(30):
            publisher.publish_window(make_caption(window, stream="held"))
    with SlowFastClient(redis_url) as client:
        held = [c.window for c in client.history("held", count=None)]
    assert len(held) > config.history_len and held[-1] == 29  # the premise: more than history_len held
    earlier = earlier_outputs(config, "held", RUN, live=False, every=0)
    assert [c.window for c in earlier.captions] == held
