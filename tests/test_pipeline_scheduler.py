"""The model worker's scheduling rules, without Ray: explicit queue states and a fake clock."""

from __future__ import annotations

import pytest

from pipeline.scheduler import Outcome, Policy, Scheduler


def outcomes(resolutions) -> list[tuple[str, Outcome]]:
    return [(r.token, r.outcome) for r in resolutions]


def seqs(batch) -> list[tuple[str, int]]:
    return [(item.lane, item.seq) for item in batch.items]


def test_newest_wins_skips_every_waiting_live_window():
    s = Scheduler(batch_size=4)
    s.add_lane("cam", Policy.NEWEST)
    assert s.submit("cam", 0, "w0", "t0") == []
    running = s.next_batch()
    assert seqs(running) == [("cam", 0)]
    # while window 0 runs, windows 1..3 arrive: each overtakes the one waiting before it
    assert s.submit("cam", 1, "w1", "t1") == []
    assert outcomes(s.submit("cam", 2, "w2", "t2")) == [("t1", Outcome.SKIPPED)]
    assert outcomes(s.submit("cam", 3, "w3", "t3")) == [("t2", Outcome.SKIPPED)]
    assert s.next_batch() is None  # one batch at a time
    assert outcomes(s.finished(running)) == [("t0", Outcome.DONE)]
    assert seqs(s.next_batch()) == [("cam", 3)]  # the newest, never a stale one
    counts = s.counts("cam")
    assert (counts.done, counts.skipped, counts.failed) == (1, 2, 0)


def test_files_are_accepted_in_order_exactly_once():
    s = Scheduler(batch_size=8)
    s.add_lane("file", Policy.ORDERED)
    assert s.submit("file", 0, "w0", "a") == []
    assert s.submit("file", 1, "w1", "b") == []
    assert outcomes(s.submit("file", 3, "w3", "c")) == [("c", Outcome.RETRY)]  # gap: re-send in order
    # re-sent while its first submission waits: the re-send (fresh payload) takes its place
    assert outcomes(s.submit("file", 1, "w1'", "d")) == [("b", Outcome.ALREADY)]
    batch = s.next_batch()
    assert seqs(batch) == [("file", 0), ("file", 1)]  # never skipped, in order
    assert batch.payloads == ["w0", "w1'"]
    # re-sent while it runs: it shares the run's outcome
    assert s.submit("file", 0, "w0'", "e") == []
    assert outcomes(s.finished(batch)) == [("a", Outcome.DONE), ("e", Outcome.DONE), ("d", Outcome.DONE)]
    assert outcomes(s.submit("file", 1, "w1", "f")) == [("f", Outcome.ALREADY)]  # done: a duplicate
    assert s.next_seq("file") == 2 and s.idle and s.counts("file").done == 2


def test_a_lane_resumed_after_a_restart_starts_where_it_was():
    """A restarted worker re-adds the file at the next window Redis does not have: earlier windows
    re-sent by the ingest are recognised, later ones wait for the gap to be filled."""
    s = Scheduler(batch_size=8)
    s.add_lane("file", Policy.ORDERED, next_seq=5)
    assert outcomes(s.submit("file", 4, "w4", "old")) == [("old", Outcome.ALREADY)]
    assert outcomes(s.submit("file", 6, "w6", "ahead")) == [("ahead", Outcome.RETRY)]
    assert s.submit("file", 5, "w5", "next") == []
    assert seqs(s.next_batch()) == [("file", 5)]


def test_batches_take_streams_round_robin_and_rotate_who_goes_first():
    s = Scheduler(batch_size=2)
    for lane in ("a", "b", "c"):
        s.add_lane(lane, Policy.ORDERED)
        for seq in range(3):
            s.submit(lane, seq, f"{lane}{seq}", f"{lane}{seq}")
    taken = []
    while (batch := s.next_batch()) is not None:
        taken.append(seqs(batch))
        s.finished(batch)
    assert taken[0] == [("a", 0), ("b", 0)]
    assert taken[1] == [("b", 1), ("c", 0)]  # the next batch starts after the previous first lane
    assert taken[2] == [("c", 1), ("a", 1)]
    flat = [x for batch in taken for x in batch]
    assert sorted(flat) == [(lane, seq) for lane in "abc" for seq in range(3)]
    for lane in "abc":  # each stream's windows still in order
        assert [seq for l, seq in flat if l == lane] == [0, 1, 2]


def test_one_busy_stream_cannot_starve_the_others():
    s = Scheduler(batch_size=4)
    s.add_lane("file", Policy.ORDERED)
    s.add_lane("cam", Policy.NEWEST)
    for seq in range(10):
        s.submit("file", seq, seq, f"f{seq}")
    s.submit("cam", 0, 0, "c0")
    assert ("cam", 0) in seqs(s.next_batch())


def test_a_failed_batch_is_retried_item_by_item_then_the_bad_item_fails(monkeypatch):
    clock = iter([100.0, 101.0, 102.0])
    s = Scheduler(batch_size=4, clock=lambda: next(clock))
    s.add_lane("a", Policy.ORDERED)
    s.add_lane("b", Policy.ORDERED)
    s.submit("a", 0, "a0", "a0")
    s.submit("b", 0, "b0", "b0")
    batch = s.next_batch()
    assert seqs(batch) == [("a", 0), ("b", 0)]
    assert s.finished(batch, "RuntimeError: boom") == []  # nothing decided: both are retried
    assert s.counts("a").last_error == "window 0: RuntimeError: boom (retrying)"
    results = {}
    for _ in range(2):
        retry = s.next_batch()
        assert len(retry.items) == 1  # alone, so one bad window cannot fail the others
        lane = retry.items[0].lane
        results[lane] = s.finished(retry, "RuntimeError: boom" if lane == "b" else None)
    assert outcomes(results["a"]) == [("a0", Outcome.DONE)]
    assert outcomes(results["b"]) == [("b0", Outcome.FAILED)]
    assert results["b"][0].error == "window 0 failed after 2 attempts: RuntimeError: boom"
    b = s.counts("b")
    assert (b.done, b.failed, b.last_error_at) == (0, 1, 102.0)
    assert (s.counts("a").done, s.counts("a").failed) == (1, 0)
    # the failure is a record: a later success does not erase it
    s.submit("b", 1, "b1", "b1")
    s.finished(s.next_batch())
    assert s.counts("b").last_error.startswith("window 0 failed") and s.counts("b").done == 1
    assert s.idle


def test_retried_windows_of_one_file_keep_their_order():
    s = Scheduler(batch_size=4)
    s.add_lane("file", Policy.ORDERED)
    for seq in range(3):
        s.submit("file", seq, seq, f"t{seq}")
    assert s.finished(s.next_batch(), "boom") == []
    retried = []
    while (batch := s.next_batch()) is not None:
        retried.append(seqs(batch))
        s.finished(batch, "boom" if batch.items[0].seq == 1 else None)
    assert retried == [[("file", 0)], [("file", 1)], [("file", 2)]]  # alone and in order
    counts = s.counts("file")
    assert (counts.done, counts.failed) == (2, 1)


def test_a_failed_live_window_is_retried_unless_a_newer_one_waits():
    s = Scheduler(batch_size=4)
    s.add_lane("cam", Policy.NEWEST)
    s.submit("cam", 0, "w0", "t0")
    first = s.next_batch()
    assert s.finished(first, "boom") == []
    retry = s.next_batch()
    assert seqs(retry) == [("cam", 0)]
    s.submit("cam", 1, "w1", "t1")  # arrives while the retry runs
    assert outcomes(s.finished(retry, "boom")) == [("t0", Outcome.FAILED)]
    second = s.next_batch()
    assert seqs(second) == [("cam", 1)]
    s.submit("cam", 2, "w2", "t2")
    # window 1 raised and window 2 is waiting: the newer one wins, window 1 is skipped
    assert outcomes(s.finished(second, "boom")) == [("t1", Outcome.SKIPPED)]
    assert seqs(s.next_batch()) == [("cam", 2)]
    counts = s.counts("cam")
    assert (counts.done, counts.skipped, counts.failed) == (0, 1, 1)


def test_removed_lanes_resolve_their_waiting_and_running_items():
    s = Scheduler(batch_size=1)
    s.add_lane("cam", Policy.ORDERED)
    s.submit("cam", 0, "w0", "t0")
    s.submit("cam", 1, "w1", "t1")
    running = s.next_batch()
    assert outcomes(s.remove_lane("cam")) == [("t1", Outcome.REMOVED)]
    assert outcomes(s.finished(running)) == [("t0", Outcome.REMOVED)]
    assert outcomes(s.submit("cam", 2, "w2", "t2")) == [("t2", Outcome.REMOVED)]
    assert s.idle


def test_finished_needs_the_running_batch():
    s = Scheduler(batch_size=1)
    s.add_lane("cam", Policy.NEWEST)
    s.submit("cam", 0, "w0", "t0")
    s.next_batch()
    from pipeline.scheduler import Batch

    with pytest.raises(ValueError):
        s.finished(Batch([]))


def test_rate_meter_follows_the_total_and_falls_to_zero_when_it_stops():
    from pipeline.rates import RateMeter

    now = [0.0]
    meter = RateMeter(span_s=2.0, clock=lambda: now[0])
    assert meter.update(0) == 0.0
    for second in range(1, 5):
        now[0] = float(second)
        rate = meter.update(4 * second)  # 4 per second
    assert rate == pytest.approx(4.0)
    for second in range(5, 8):  # the total stops moving
        now[0] = float(second)
        rate = meter.update(16)
    assert rate == 0.0


def test_a_file_window_whose_frames_are_lost_is_accepted_again_from_its_restarted_source():
    """Windows 2 and 3 were accepted, then their sender (which owned their frames) died: window 2
    cannot run. It is no model failure: the lane goes back to expecting window 2, the later
    window is dropped too, both answer RETRY, and the restarted sender's re-sends are accepted
    in order; nothing counts as failed."""
    s = Scheduler(batch_size=1)
    s.add_lane("file", Policy.ORDERED, next_seq=2)
    assert s.submit("file", 2, "w2", "a") == [] and s.submit("file", 3, "w3", "b") == []
    batch = s.next_batch()
    assert outcomes(s.frames_lost(batch, batch.items[0], "frames gone")) == [
        ("a", Outcome.RETRY), ("b", Outcome.RETRY)]
    assert s.next_seq("file") == 2 and s.waiting("file") == 0 and s.idle
    # the restarted sender re-sends from window 0: done ones are recognised, 2 and 3 accepted
    assert outcomes(s.submit("file", 1, "w1", "c")) == [("c", Outcome.ALREADY)]
    assert outcomes(s.submit("file", 3, "w3'", "d")) == [("d", Outcome.RETRY)]  # still in order
    assert s.submit("file", 2, "w2'", "e") == [] and s.submit("file", 3, "w3'", "f") == []
    batch = s.next_batch()
    assert batch.payloads == ["w2'"]
    assert outcomes(s.finished(batch)) == [("e", Outcome.DONE)]
    counts = s.counts("file")
    assert (counts.done, counts.skipped, counts.failed) == (1, 0, 0)
    assert counts.last_error == "window 2: frames gone (re-sent by its source)"


def test_a_lost_window_running_with_others_sends_back_only_its_lane_from_it():
    """A batch of two files' windows: file a's window 1 lost its frames. Its lane rolls back to 1
    (window 2 in the same batch answers RETRY); window 0 of a and b's window run again, untouched;
    a re-send of the lost window made while it ran answers RETRY with it."""
    s = Scheduler(batch_size=4)
    s.add_lane("a", Policy.ORDERED)
    s.add_lane("b", Policy.ORDERED)
    for seq in range(3):
        s.submit("a", seq, f"a{seq}", f"a{seq}")
    s.submit("b", 0, "b0", "b0")
    batch = s.next_batch()
    assert seqs(batch) == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert s.submit("a", 1, "a1'", "a1'") == []  # the restarted sender's re-send, while it runs
    lost = batch.items[2]
    assert outcomes(s.frames_lost(batch, lost, "frames gone")) == [
        ("a1", Outcome.RETRY), ("a1'", Outcome.RETRY), ("a2", Outcome.RETRY)]
    assert s.next_seq("a") == 1 and s.next_seq("b") == 1
    again = s.next_batch()
    assert sorted(seqs(again)) == [("a", 0), ("b", 0)] and all(i.attempts == 0 for i in again.items)
    assert sorted(outcomes(s.finished(again))) == [("a0", Outcome.DONE), ("b0", Outcome.DONE)]
    assert s.counts("a").failed == 0


def test_a_live_window_whose_frames_are_lost_is_skipped_not_failed():
    s = Scheduler(batch_size=1)
    s.add_lane("cam", Policy.NEWEST, next_seq=7)
    s.submit("cam", 7, "w7", "t7")
    batch = s.next_batch()
    s.submit("cam", 8, "w8", "t8")  # newer frames, from the restarted sender
    assert outcomes(s.frames_lost(batch, batch.items[0], "frames gone")) == [("t7", Outcome.SKIPPED)]
    assert seqs(s.next_batch()) == [("cam", 8)] and s.next_seq("cam") == 9
    counts = s.counts("cam")
    assert (counts.done, counts.skipped, counts.failed) == (0, 1, 0)


def test_a_live_window_sent_back_by_another_lanes_lost_frames_still_gives_way_to_a_newer_one():
    s = Scheduler(batch_size=2)
    s.add_lane("file", Policy.ORDERED)
    s.add_lane("cam", Policy.NEWEST)
    s.submit("file", 0, "f0", "f0")
    s.submit("cam", 0, "c0", "c0")
    batch = s.next_batch()
    s.submit("cam", 1, "c1", "c1")  # arrives while the batch runs
    lost = next(i for i in batch.items if i.lane == "file")
    assert sorted(outcomes(s.frames_lost(batch, lost, "frames gone"))) == [
        ("c0", Outcome.SKIPPED), ("f0", Outcome.RETRY)]
    assert seqs(s.next_batch()) == [("cam", 1)] and s.counts("cam").skipped == 1
