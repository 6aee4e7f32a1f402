"""Summaries of long videos, as plain logic (no Ray, no Redis, no model).

A rolling summary covers the captions of the windows since the previous one and is written
given that previous summary, so each prompt stays the same size however long the video is.
The final summary of a file is built as a tree: the rolling summaries are summarised in
groups of `fan_in`, those results again, until one remains, so a 10-hour file needs the same
prompt size as a 10-minute one (about log_fan_in(n) rounds of batched text-only calls).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from connectors.redis_schema import Caption, Summary, SummaryKind

# Characters of one caption / one summary that go into a prompt, and of all of them together:
# bounds the prompt (well inside the model's context and its question limit) however verbose
# the model is or however many windows one summary covers (a 64-token caption is ~300 characters).
CAPTION_CHARS = 600
SUMMARY_CHARS = 1500
PROMPT_BUDGET_CHARS = 12_000
FINAL_FAN_IN = 8
MAX_PENDING_FACTOR = 4

ROLLING_INSTRUCTION = (
    "Below are timestamped descriptions of consecutive parts of a video{previous_note}. "
    "Write a concise summary of what happens, in time order, keeping times of notable events."
)
FINAL_INSTRUCTION = (
    "Below are summaries of consecutive parts of one video, in time order, with their time ranges. "
    "Write one concise summary of the whole video, in time order, keeping times of notable events."
)


def clock(seconds: float) -> str:
    """h:mm:ss of stream time."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def default_summary_every(window: int, stride: int, fps: float, seconds: float = 60.0) -> int:
    """Windows that advance about `seconds` of video (at least 1)."""
    return max(1, round(seconds * fps / stride))


def rolling_prompt(previous: str | None, captions: Sequence[Caption]) -> str:
    each = max(40, min(CAPTION_CHARS, (PROMPT_BUDGET_CHARS - SUMMARY_CHARS) // max(1, len(captions)) - 25))
    lines = [f"[{clock(c.start)}-{clock(c.end)}] {_clip(c.text, each)}" for c in captions]
    note = ", and the summary of the video before them" if previous else ""
    parts = [ROLLING_INSTRUCTION.format(previous_note=note)]
    if previous:
        parts.append(f"Summary so far: {_clip(previous, SUMMARY_CHARS)}")
    parts.append("Descriptions:\n" + "\n".join(lines))
    return "\n\n".join(parts)


def final_prompt(parts: Sequence[Summary]) -> str:
    lines = [f"[{clock(s.start)}-{clock(s.end)}] {_clip(s.text, SUMMARY_CHARS)}" for s in parts]
    return FINAL_INSTRUCTION + "\n\n" + "\n".join(lines)


@dataclass(frozen=True)
class SummaryTask:
    """A text-only prompt whose answer becomes `Summary` of windows first..last."""

    stream: str
    run: int
    kind: SummaryKind
    first_window: int
    last_window: int
    start: float
    end: float
    prompt: str
    level: int = 0  # 0: rolling (over captions); n: a final-summary round over level n-1

    def result(self, text: str, seq: int) -> Summary:
        return Summary(
            stream=self.stream, run=self.run, seq=seq, kind=self.kind, level=self.level,
            first_window=self.first_window, last_window=self.last_window, start=self.start, end=self.end, text=text,
        )


@dataclass
class RollingSummaries:
    """One stream's rolling-summary bookkeeping: captions since the last summary, the last
    summary, and every summary so far (the input of the final summary)."""

    stream: str
    run: int
    every_n_windows: int
    pending: list[Caption] = field(default_factory=list)
    previous: Summary | None = None
    done: list[Summary] = field(default_factory=list)
    in_flight: SummaryTask | None = None
    skipped: int = 0  # due summaries that had no room (live streams): their captions roll into the next

    @classmethod
    def resumed(cls, stream: str, run: int, every_n_windows: int, done: Sequence[Summary],
                since: Sequence[Caption]) -> RollingSummaries:
        """A stream continuing its run: its summaries so far and the captions after the last one."""
        return cls(stream, run, every_n_windows, pending=list(since), previous=done[-1] if done else None,
                   done=list(done))

    def add_caption(self, caption: Caption) -> None:
        self.pending.append(caption)
        # A live stream whose summaries keep finding no room: keep the newest captions only.
        del self.pending[: max(0, len(self.pending) - MAX_PENDING_FACTOR * self.every_n_windows)]

    def due(self) -> bool:
        return self.in_flight is None and len(self.pending) >= self.every_n_windows

    def next_task(self, force: bool = False) -> SummaryTask | None:
        """The task summarising the pending captions when due (`force`: any left, e.g. at EOF)."""
        if self.in_flight is not None or not self.pending or not (force or self.due()):
            return None
        covered = list(self.pending)
        self.in_flight = SummaryTask(
            self.stream, self.run, SummaryKind.ROLLING, covered[0].window, covered[-1].window,
            covered[0].start, covered[-1].end, rolling_prompt(self.previous.text if self.previous else None, covered),
        )
        return self.in_flight

    def abandon(self) -> None:
        """The in-flight task did not complete (its model call failed, or it is redone at the
        end of a file): its captions stay pending."""
        self.in_flight = None

    def skip(self) -> None:
        """The in-flight task will not run: its captions stay pending for the next one."""
        self.abandon()
        self.skipped += 1

    def complete(self, text: str) -> Summary:
        task = self.in_flight
        if task is None:
            raise RuntimeError(f"no summary of {self.stream} is in flight")
        summary = task.result(text, seq=len(self.done))
        self.pending = [c for c in self.pending if c.window > task.last_window]
        self.previous, self.in_flight = summary, None
        self.done.append(summary)
        return summary


class FinalSummary:
    """Summaries of summaries: each round turns groups of `fan_in` parts into one, until one
    is left. `tasks()` gives the current round's prompts (batch them), `complete()` advances."""

    def __init__(self, parts: Sequence[Summary], fan_in: int = FINAL_FAN_IN):
        if fan_in < 2:
            raise ValueError(f"fan_in must be >= 2, got {fan_in}")
        if not parts:
            raise ValueError("a final summary needs at least one summary")
        self.fan_in = fan_in
        self.level = max(p.level for p in parts)
        self.parts = list(parts)
        self.rounds = 0

    @staticmethod
    def rounds_needed(count: int, fan_in: int = FINAL_FAN_IN) -> int:
        """Rounds for `count` parts: the tree's depth (1 when a single rolling summary must still
        become a whole-video one)."""
        return max(1, math.ceil(math.log(count, fan_in))) if count > 1 else 1

    @property
    def finished(self) -> Summary | None:
        return self.parts[0] if self.rounds and len(self.parts) == 1 else None

    def tasks(self) -> list[SummaryTask]:
        if self.finished is not None:
            return []
        groups = [self.parts[i : i + self.fan_in] for i in range(0, len(self.parts), self.fan_in)]
        last_round = len(groups) == 1
        return [
            SummaryTask(
                g[0].stream, g[0].run, SummaryKind.FINAL if last_round else SummaryKind.PARTIAL,
                g[0].first_window, g[-1].last_window, g[0].start, g[-1].end, final_prompt(g), level=self.level + 1,
            )
            for g in groups
        ]

    def complete(self, texts: Sequence[str], first_seq: int) -> list[Summary]:
        tasks = self.tasks()
        if len(texts) != len(tasks):
            raise ValueError(f"{len(tasks)} summaries expected, got {len(texts)}")
        self.parts = [t.result(text, seq=first_seq + i) for i, (t, text) in enumerate(zip(tasks, texts))]
        self.level += 1
        self.rounds += 1
        return self.parts


def summary_markdown(stream: str, source: str, final: Summary, rolling: Sequence[Summary]) -> str:
    """summary.md: the whole-video summary, then the rolling summaries as a timeline."""
    lines = [
        f"# Summary of {stream}",
        "",
        f"Source: `{source}`  ",
        f"Covers {clock(final.start)}-{clock(final.end)} (windows {final.first_window}-{final.last_window}).",
        "",
        "## Whole video",
        "",
        final.text.strip() or "(empty)",
        "",
        "## Timeline",
        "",
    ]
    for s in rolling:
        lines.append(f"- **{clock(s.start)}-{clock(s.end)}** (windows {s.first_window}-{s.last_window}): "
                     f"{' '.join(s.text.split()) or '(empty)'}")
    return "\n".join(lines) + "\n"
