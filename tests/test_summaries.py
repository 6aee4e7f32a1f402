"""Summary logic without Ray: coverage of rolling summaries, the final-summary tree, summary.md."""

from __future__ import annotations

import pytest

from connectors.redis_schema import SummaryKind
from model.prompt import MAX_PROMPT_CHARS
from pipeline.summaries import (
    FinalSummary,
    RollingSummaries,
    clock,
    default_summary_every,
    rolling_prompt,
    summary_markdown,
)
from tests.support.records import RUN, make_caption


def captions(count: int):
    return [make_caption(i, stream="cam", text=f"scene {i}") for i in range(count)]


def test_default_is_about_one_minute_of_windows():
    assert default_summary_every(64, 16, 4.0) == 15  # a window every 4 s
    assert default_summary_every(8, 8, 1.0) == 8
    assert default_summary_every(64, 64, 0.5) == 1


def test_rolling_summaries_cover_exactly_the_windows_in_between():
    rolling = RollingSummaries("cam", run=RUN, every_n_windows=3)
    covered = []
    for c in captions(10):
        rolling.add_caption(c)
        task = rolling.next_task()
        if task is not None:
            summary = rolling.complete(f"summary {len(covered)}")
            covered.append((summary.first_window, summary.last_window))
    assert covered == [(0, 2), (3, 5), (6, 8)]
    task = rolling.next_task(force=True)  # end of file: the rest
    assert (task.first_window, task.last_window) == (9, 9)
    assert "Summary so far: summary 2" in task.prompt and "scene 9" in task.prompt and "scene 8" not in task.prompt


def test_a_skipped_summary_rolls_its_captions_into_the_next():
    rolling = RollingSummaries("cam", run=RUN, every_n_windows=2)
    for c in captions(2):
        rolling.add_caption(c)
    assert rolling.next_task() is not None
    rolling.skip()
    for c in captions(4)[2:]:
        rolling.add_caption(c)
    task = rolling.next_task()
    assert (task.first_window, task.last_window) == (0, 3) and rolling.skipped == 1


def test_captions_arriving_while_a_summary_runs_are_kept_for_the_next():
    rolling = RollingSummaries("cam", run=RUN, every_n_windows=2)
    cs = captions(3)
    rolling.add_caption(cs[0]); rolling.add_caption(cs[1])
    rolling.next_task()
    rolling.add_caption(cs[2])
    assert rolling.next_task() is None  # one at a time
    rolling.complete("a")
    assert [c.window for c in rolling.pending] == [2]


def test_rolling_prompt_has_timestamps_and_previous_summary():
    prompt = rolling_prompt("earlier things", captions(2))
    assert "[0:00:00-0:00:15] scene 0" in prompt and "Summary so far: earlier things" in prompt
    assert clock(36001.5) == "10:00:01"


@pytest.mark.parametrize("count", [1, 2, 8, 9, 64, 600])
def test_final_summary_is_a_tree_with_bounded_prompts(count):
    rolling = RollingSummaries("cam", run=RUN, every_n_windows=1)
    for c in captions(count):
        rolling.add_caption(c)
        rolling.next_task()
        rolling.complete(f"part {c.window} " + "x" * 5000)  # verbose parts are clipped in prompts
    final = FinalSummary(rolling.done, fan_in=8)
    rounds, longest = 0, 0
    while final.finished is None:
        tasks = final.tasks()
        assert all(len(t.prompt) < MAX_PROMPT_CHARS for t in tasks)
        longest = max(longest, max(len(t.prompt) for t in tasks))
        final.complete([f"r{rounds}-{i}" for i in range(len(tasks))], first_seq=0)
        rounds += 1
    assert rounds == FinalSummary.rounds_needed(count, 8)
    result = final.finished
    assert result.kind == SummaryKind.FINAL
    assert (result.first_window, result.last_window) == (0, count - 1)
    assert result.start == 0.0 and result.end == (count - 1) * 4.0 + 15.75


def test_summary_markdown_lists_final_and_timeline():
    rolling = RollingSummaries("cam", run=RUN, every_n_windows=2)
    for c in captions(4):
        rolling.add_caption(c)
        if rolling.next_task():
            rolling.complete(f"part ending {c.window}")
    final = FinalSummary(rolling.done)
    final.complete(["the whole video"], first_seq=0)
    text = summary_markdown("cam", "/data/x.mp4", final.finished, rolling.done)
    assert text.startswith("# Summary of cam\n")
    assert "the whole video" in text
    assert "- **0:00:00-0:00:19** (windows 0-1): part ending 1" in text
    assert "- **0:00:08-0:00:27** (windows 2-3): part ending 3" in text
