"""Splitting a file over the model workers, without Ray: segment plans, the window numbering
they keep, in-order release, what moves and what is read again, and the ETA."""

from __future__ import annotations

import numpy as np
import pytest

from connectors.redis_schema import IngestState
from pipeline.engine.model_runner import Reply, WindowReplies
from pipeline.messages import IngestReport, StreamStats
from pipeline.segments import (
    InOrder, Progress, Segment, SegmentOutbox, SplitRun, min_segment_windows, plan_segments,
)
from pipeline.window import FrameRef, SlidingWindow, Window, expected_windows

WINDOW, STRIDE, FPS, MIN_S = 8, 4, 4.0, 20.0


def windows_of(frames: int, segment: Segment | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """(seq, frame numbers) of the windows an ingest makes over frames 0..frames-1 (or over one
    segment: from its first frame, stopping after its last window, the tail at the end)."""
    first = segment.first_frame(STRIDE) if segment else 0
    sliding = SlidingWindow("film", WINDOW, STRIDE, live=False, first_seq=segment.first_seq() if segment else 0)
    made = []
    for n in range(first, frames):
        window = sliding.push(FrameRef(n, n / FPS, 0.0, None))
        if window is not None:
            made.append(window)
            if segment is not None and segment.ends_with(window.seq):
                break
    else:
        if (tail := sliding.finish()) is not None:
            made.append(tail)
    return [(w.seq, tuple(f.seq for f in w.frames)) for w in made]


@pytest.mark.parametrize("frames", [360, 361, 363, 1000])
@pytest.mark.parametrize("workers", [2, 3, 8])
def test_segments_give_the_windows_of_a_single_pass_each_once(frames, workers):
    """Whatever the length (tail window or none) and worker count: the segments' windows, put
    together, are the single pass's windows, each made by exactly one segment, with the same frames."""
    segments = plan_segments(frames, WINDOW, STRIDE, FPS, MIN_S, workers)
    assert len(segments) >= 2
    made = [w for s in segments for w in windows_of(frames, s)]
    assert made == windows_of(frames)
    assert len(made) == expected_windows(frames, WINDOW, STRIDE)
    assert segments[0].first_frame(STRIDE) == 0 and segments[-1].end_window is None
    for before, after in zip(segments, segments[1:]):
        assert before.end_window == after.first_window
        # the pre-roll: a segment starts window - stride frames before the first frame no earlier window holds
        assert after.first_frame(STRIDE) == (after.first_window - 1) * STRIDE + WINDOW - (WINDOW - STRIDE)


def test_a_plan_sizes_segments_by_workers_and_length_and_leaves_short_files_whole():
    shortest = min_segment_windows(WINDOW, STRIDE, FPS, MIN_S)
    assert shortest == 20  # 20 s of video at 4 fps, stride 4
    assert min_segment_windows(64, 16, 4.0, MIN_S) == 24  # the released shape: 8 pre-rolls of 48 frames
    assert plan_segments(360, WINDOW, STRIDE, FPS, MIN_S, workers=1) == []  # one worker: as ever
    assert plan_segments(80, WINDOW, STRIDE, FPS, MIN_S, workers=2) == []  # 19 windows: not two segments' worth
    assert len(plan_segments(360, WINDOW, STRIDE, FPS, MIN_S, workers=2)) == 4  # 89 windows: 4 of at least 20
    many = plan_segments(100_000, WINDOW, STRIDE, FPS, MIN_S, workers=8)
    assert len(many) == 32  # 4 per worker, so none waits at the end for a long one
    sizes = [s.end_window - s.first_window for s in many[:-1]]
    assert max(sizes) - min(sizes) <= 1
    resumed = plan_segments(360, WINDOW, STRIDE, FPS, MIN_S, workers=2, next_window=40)
    assert resumed[0].first_window == 40 and len(resumed) == 2


def test_in_order_releases_each_window_once_and_none_past_a_gap():
    release: InOrder[str] = InOrder(next_seq=5)
    assert release.add(7, "w7") == []
    assert release.add(6, "w6") == []
    assert release.add(4, "w4") == []  # before the start: done already
    assert release.add(5, "w5") == ["w5", "w6", "w7"]
    assert release.add(6, "again") == [] and release.add(9, "w9") == []
    assert release.received_through(8, 12) == 8 and release.received_through(9, 12) == 10
    assert release.received_through(2, 6) == 6  # all released
    assert release.drop() == 1 and release.add(8, "w8") == ["w8"] and release.next == 9


def result(outbox: SegmentOutbox, seq: int, text: str = "c", error: str | None = None):
    frames = tuple(FrameRef(n, n / FPS, 100.0 + n, object()) for n in range(seq * STRIDE, seq * STRIDE + WINDOW))
    window = Window(outbox.lane, seq, frames, live=False)
    if error is not None:
        outbox(window, None, None, error)
    else:
        outbox(window, WindowReplies(window, None, Reply(text, 0.5), []), np.zeros((8, 8, 3), np.uint8))
    return outbox.take()


def split_run(segments=None, workers=2) -> SplitRun:
    segments = segments or plan_segments(360, WINDOW, STRIDE, FPS, MIN_S, workers)
    return SplitRun("film", segments, 0, 89, workers, run_tag="t", overlap_frames=WINDOW - STRIDE)


def test_an_outbox_sends_what_the_merge_needs_and_no_frame_reference():
    outbox = SegmentOutbox("film", "film~t.1")
    (sent,) = result(outbox, 3, "a red circle")
    assert sent.lane == "film~t.1" and sent.window.stream == "film" and sent.window.seq == 3
    assert (sent.window.start, sent.window.end, sent.window.wall_end) == (3.0, 4.75, 119.0)
    assert all(f.ref is None for f in sent.window.frames)
    assert sent.picture.startswith(b"\xff\xd8") and sent.replies().caption.text == "a red circle"
    (failed,) = result(outbox, 4, error="boom")
    assert failed.error == "boom" and failed.caption is None and outbox.take() == []


def test_workers_take_the_next_segment_as_they_finish_and_windows_release_in_order():
    run = split_run()
    started = run.assign()
    assert [(a.segment.index, a.worker) for _, a in started] == [(0, 0), (1, 1)]
    assert run.assign() == []  # one segment of a file per worker at a time
    lanes = {a.segment.index: lane for lane, a in started}
    first = SegmentOutbox("film", lanes[0])
    second = SegmentOutbox("film", lanes[1])
    ahead = run.receive(result(second, run.segments[1].first_window))
    assert ahead == []  # segment 1 is ahead: it waits
    released = [r for seq in range(run.segments[1].first_window) for r in run.receive(result(first, seq))]
    assert [r.window.seq for r in released] == list(range(run.segments[1].first_window + 1))
    assert run.receive(result(first, 0)) == []  # nothing twice
    assert run.resume_window(lanes[1]) == run.segments[1].first_window + 1
    run.ended(lanes[0])
    (nxt,) = run.assign()
    assert nxt[1].segment.index == 2 and nxt[1].worker == 0  # the worker that finished takes the next
    assert run.done == run.segments[1].first_window + 1 and not run.over


def test_a_dead_workers_segment_moves_and_restarts_after_what_its_merge_has():
    run = split_run(workers=3)
    started = dict(run.assign())
    lane = next(lane for lane, a in started.items() if a.worker == 1)
    outbox = SegmentOutbox("film", lane)
    first = started[lane].segment.first_window
    for seq in (first, first + 1):
        run.receive(result(outbox, seq))
    moved = run.worker_lost(1)
    assert [(moved_lane, a.worker) for moved_lane, a in moved] == [(lane, 0)]
    assert run.resume_window(lane) == first + 2  # no window twice, none lost
    assert 1 not in {w for _, a in run.assign() for w in [a.worker]}


def test_a_scan_mismatch_reads_everything_not_released_again_in_one_pass():
    run = split_run()
    started = dict(run.assign())
    by_index = {a.segment.index: lane for lane, a in started.items()}
    run.receive(result(SegmentOutbox("film", by_index[0]), 0))
    run.receive(result(SegmentOutbox("film", by_index[1]), run.segments[1].first_window))
    cancelled = run.failed_segment(by_index[1], "video source x: a sampled frame differs", mismatch=True)
    assert cancelled == [by_index[0]] and run.fell_back
    assert not run.release.waiting  # segment 1's windows are dropped: numbered by a wrong scan
    (lane, assignment) = run.assign()[0]
    assert assignment.segment == Segment(4, 1, None, seek=False)  # from the start of the file, from window 1 on
    assert assignment.segment.first_seq() == 0 and assignment.segment.source_options(object(), STRIDE) == {}
    late = run.receive(result(SegmentOutbox("film", by_index[0]), 1))
    assert late == [] and run.release.next == 1  # a cancelled lane counts no more
    run.receive([r for seq in range(1, 89) for r in result(SegmentOutbox("film", lane), seq)])
    run.ended(lane)
    assert run.over and run.complete


def test_a_failed_segment_stops_the_later_ones_and_the_file_is_not_complete():
    run = split_run(workers=4)
    started = dict(run.assign())
    by_index = {a.segment.index: lane for lane, a in started.items()}
    cancelled = run.failed_segment(by_index[1], "video source x: not a readable media file", mismatch=False)
    assert sorted(cancelled) == sorted([by_index[2], by_index[3]]) and not run.queued
    assert run.error.endswith("not a readable media file")
    run.ended(by_index[0])
    assert run.over and not run.complete


def test_status_counts_each_sampled_frame_once_and_gives_progress_and_eta():
    clock = [0.0]
    progress = Progress(clock=lambda: clock[0])
    run = split_run()
    started = dict(run.assign())
    for lane, assignment in started.items():
        report = IngestReport(state=IngestState.LIVE, live=False, frames_in=100, windows_emitted=20, fps_in=10.0)
        run.report(lane, report, StreamStats(frames_encoded=100))
    outbox = SegmentOutbox("film", next(iter(started)))
    run.receive(result(outbox, 0))
    assert run.status(IngestState.LIVE, progress, 1.5, 3.0).eta_s is None  # no rate yet
    clock[0] = 10.0
    run.receive([r for seq in range(1, 11) for r in result(outbox, seq)])
    status = run.status(IngestState.LIVE, progress, 1.5, 3.0)
    assert status.frames_in == 200 - (WINDOW - STRIDE)  # the second segment's pre-roll is the first's too
    assert (status.windows_done, status.windows_total, status.windows_emitted) == (11, 89, 40)
    assert status.eta_s == pytest.approx(78 / 1.0)  # 10 windows in 10 s, 78 to go
    assert status.fps_in == 20.0 and status.latency_s == 1.5 and status.fps_out == 3.0
