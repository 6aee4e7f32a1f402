"""Questions about a stream's past and reports on a time range, answered from its history in
Redis by the model, text-only (no Ray here: the model is a function given in).

A question about the past retrieves the range's entries that share its words (search, any
word, best first) and the range's latest summaries, and asks the model one prompt holding
them in time order with their times. A report summarises the range's captions with the
summary tree (rolling prompts over groups of captions, then summaries of summaries), lists
the events that opened and closed in it and the pictures Redis still holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from connectors.client import SlowFastClient
from connectors.redis_schema import (
    MAX_QUESTION_CHARS,
    Answer,
    AnswerKind,
    Caption,
    EntryKind,
    Event,
    EventSpan,
    Hit,
    Question,
    Report,
    SummaryKind,
    window_entry_id,
)
from connectors.search import SearchRequest, entry_time, make_hit
from model.prompt import MAX_PROMPT_CHARS

from .summaries import FinalSummary, SummaryTask, clock, rolling_prompt

AskModel = Callable[[Sequence[str]], list[str]]  # text-only prompts -> the model's replies, in order

HISTORY_HITS = 24  # entries search retrieves for a question
HISTORY_SUMMARIES = 6  # the range's latest summaries added to them
ENTRY_CHARS = 400  # of one entry's text in the prompt, at most
HISTORY_BUDGET_CHARS = 10_000  # all entries together
HISTORY_INSTRUCTION = (
    "Below are timestamped records of what the video stream {stream} showed, in time order: captions of its "
    "windows, events raised by its standing questions and summaries. Each starts with its wall-clock time and "
    "its video time. Answer the question from these records alone and give the times; if they do not tell, say so."
)
# The prompt stays inside the model's own bound whatever the entries and the question hold.
assert HISTORY_BUDGET_CHARS + MAX_QUESTION_CHARS + len(HISTORY_INSTRUCTION) + 200 < MAX_PROMPT_CHARS


def wall_clock(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- questions about the past


def retrieve(client: SlowFastClient, question: Question) -> list[Hit]:
    """The entries a question about the past draws on, oldest first: those of its range that
    share its words (captions, events, summaries), the range's latest summaries, and, when
    neither finds anything, the range's latest captions."""
    request = SearchRequest(question.text, (question.stream,), (EntryKind.CAPTION, EntryKind.EVENT, EntryKind.SUMMARY),
                            question.start, question.end, HISTORY_HITS, match_all=False)
    try:
        found = client.searcher.search(request).hits
    except ValueError:  # no searchable word ("What happened?"): the summaries and latest captions tell
        found = []
    summaries = client.entries_between(question.stream, EntryKind.SUMMARY, question.start, question.end)
    found += [make_hit(question.stream, EntryKind.SUMMARY, entry_id, s, entry_time(EntryKind.SUMMARY, s))
              for entry_id, s in summaries[-HISTORY_SUMMARIES:]]
    if not found:
        captions = client.entries_between(question.stream, EntryKind.CAPTION, question.start, question.end)
        found = [make_hit(question.stream, EntryKind.CAPTION, entry_id, c, c.wall_end)
                 for entry_id, c in captions if c.text and not c.error][-HISTORY_HITS:]
    unique = {(h.kind, h.entry_id): h for h in found}
    return sorted(unique.values(), key=lambda h: (h.wall_time, h.entry_id))


def describe_hit(hit: Hit) -> str:
    """One record of a prompt or a listing: times, what it is, its text."""
    video = f"video {clock(hit.start)}-{clock(hit.end)}" if hit.start is not None and hit.end is not None else "video ?"
    if hit.kind is EntryKind.SUMMARY:
        what = f"summary of windows {hit.first_window}-{hit.window}"
    elif hit.kind is EntryKind.EVENT:
        what = f"event on window {hit.window}: {hit.question} ->"
    elif hit.kind is EntryKind.ANSWER:
        what = f"answer on window {hit.window}: {hit.question} ->"
    else:
        what = f"caption of window {hit.window}:"
    return f"[{wall_clock(hit.wall_time)} | {video}] {what}"


def history_prompt(stream: str, question: str, hits: Sequence[Hit]) -> str:
    """The text-only prompt: the instruction, the entries in time order with their times, the question."""
    each = max(60, min(ENTRY_CHARS, HISTORY_BUDGET_CHARS // max(1, len(hits)) - 80))
    records = [f"{describe_hit(h)} {_clip(h.text, each)}" for h in hits]
    body = "\n".join(records) if records else "(no records in this range)"
    return f"{HISTORY_INSTRUCTION.format(stream=stream)}\n\nRecords:\n{body}\n\nQuestion: {question}"


def answer_history(client: SlowFastClient, question: Question, ask: AskModel, model: str) -> Answer:
    """The reply to a question about the past: the model's answer and the entries it drew on."""
    hits = retrieve(client, question)
    base = dict(question_id=question.id or "", stream=question.stream, question=question.text,
                kind=AnswerKind.HISTORY, sources=hits, model=model)
    if not hits:
        return Answer(**base, error=f"stream {question.stream!r} has no captions, events or summaries in that range")
    (text,) = ask([history_prompt(question.stream, question.text, hits)])
    return Answer(**base, text=text, start=hits[0].start, end=hits[-1].end)


# ---------------------------------------------------------------------------- reports


def report_summary(captions: Sequence[Caption], every: int, ask: AskModel) -> str:
    """The summary tree over captions: a rolling prompt per `every` captions (all at once), then
    rounds of summaries of summaries (FinalSummary) until one is left."""
    captioned = [c for c in captions if c.text and not c.error]
    if not captioned:
        return ""
    groups = [captioned[i: i + every] for i in range(0, len(captioned), max(1, every))]
    tasks = [SummaryTask(g[0].stream, g[0].run, SummaryKind.ROLLING, g[0].window, g[-1].window, g[0].start,
                         g[-1].end, rolling_prompt(None, g)) for g in groups]
    parts = [t.result(text, seq=i) for i, (t, text) in enumerate(zip(tasks, ask([t.prompt for t in tasks])))]
    tree = FinalSummary(parts)
    while tree.finished is None:
        round_tasks = tree.tasks()
        tree.complete(ask([t.prompt for t in round_tasks]), first_seq=0)
    return tree.finished.text


def event_spans(events: Sequence[tuple[str, Event]], pictures: dict[str, Hit]) -> list[EventSpan]:
    """The range's events as spans, opened on their first window and closed after their last,
    with the first window's picture while Redis holds it. Records that name their event
    (`event_id`: opened, updated, closed) are one span each; others, one per standing question's
    windows in a row."""
    spans: list[EventSpan] = []
    current: dict[str, int] = {}  # event id, or question id -> index in spans
    for _, event in sorted(events, key=lambda item: (item[1].window, item[0])):
        key = getattr(event, "event_id", None) or event.question_id
        fired = getattr(event, "phase", None) != "closed"
        index = current.get(key)
        span = spans[index] if index is not None else None
        if span is not None and (key != event.question_id or event.window <= span.last_window + 1):
            if event.window > span.last_window:
                spans[index] = span.model_copy(update={"last_window": event.window, "end": event.end,
                                                       "closed": event.wall_end, "windows": span.windows + fired})
            continue
        first = getattr(event, "first_window", None)
        picture = pictures.get(window_entry_id(event.run, event.window if first is None else first))
        current[key] = len(spans)
        spans.append(EventSpan(
            question_id=event.question_id, question=event.question, first_window=event.window,
            last_window=event.window, windows=int(fired), start=event.start, end=event.end, opened=event.wall_end,
            closed=event.wall_end, text=event.text, picture_key=picture.picture_key if picture else None,
            picture_id=picture.picture_id if picture else None,
        ))
    return spans


def build_report(stream: str, start: float | None, end: float | None, captions: Sequence[Caption],
                 events: Sequence[tuple[str, Event]], pictures: Sequence[Hit], every: int, ask: AskModel) -> Report:
    """The report from its parts: the captions it summarises, the range's events and the windows
    whose picture Redis holds."""
    by_window = {p.window_entry_id: p for p in pictures}
    windows = [c.window for c in captions]
    return Report(
        stream=stream, start=start, end=end, captions=len(captions),
        first_window=min(windows) if windows else None, last_window=max(windows) if windows else None,
        summary=report_summary(captions, every, ask), events=event_spans(events, by_window), pictures=list(pictures),
    )


def range_pictures(client: SlowFastClient, stream: str, captions: Sequence[tuple[str, Caption]]) -> list[Hit]:
    hits = [make_hit(stream, EntryKind.CAPTION, entry_id, c, c.wall_end) for entry_id, c in captions]
    return [h for h in client.searcher.with_pictures(hits) if h.picture_key is not None]


def answer_report(client: SlowFastClient, question: Question, ask: AskModel, every: int, model: str) -> Answer:
    """The reply to a report request: the Report and its Markdown."""
    base = dict(question_id=question.id or "", stream=question.stream, question=question.text,
                kind=AnswerKind.REPORT, model=model)
    captions = client.entries_between(question.stream, EntryKind.CAPTION, question.start, question.end)
    events = client.entries_between(question.stream, EntryKind.EVENT, question.start, question.end)
    if not captions and not events:
        return Answer(**base, error=f"stream {question.stream!r} has no captions or events in that range")
    report = build_report(question.stream, question.start, question.end, [c for _, c in captions], events,
                          range_pictures(client, question.stream, captions), every, ask)
    return Answer(**base, text=report_markdown(report), report=report,
                  window=report.last_window, start=captions[0][1].start if captions else None,
                  end=captions[-1][1].end if captions else None)


def redis_picture(hit: Hit | EventSpan) -> str | None:
    """Where a picture is in Redis, for a reader with redis-cli."""
    if hit.picture_key is None:
        return None
    if hit.picture_key.endswith(":frame"):
        return f"`HGET {hit.picture_key} jpeg` (while window {hit.picture_id} is the newest)"
    return f"`XRANGE {hit.picture_key} {hit.picture_id} {hit.picture_id}`"


PictureLink = Callable[[Hit | EventSpan], str | None]


def report_markdown(report: Report, picture: PictureLink = redis_picture) -> str:
    """The report as Markdown. `picture` says where each picture is (a Redis key by default; a
    file beside the report, or a URL of the web app)."""
    span = f"{wall_clock(report.start) if report.start is not None else 'the start'} to " \
           f"{wall_clock(report.end) if report.end is not None else 'now'}"
    lines = [f"# Report on {report.stream}, {span}", ""]
    if report.captions:
        lines += [f"{report.captions} captions, windows {report.first_window}-{report.last_window}.", ""]
    lines += ["## Summary", "", report.summary.strip() or "(no captions in this range)", "", "## Events", ""]
    if not report.events:
        lines.append("No events.")
    for e in report.events:
        where = picture(e)
        lines.append(f"- **{e.question}** opened {wall_clock(e.opened)} (window {e.first_window}, video "
                     f"{clock(e.start)}), closed after {wall_clock(e.closed)} (window {e.last_window}, video "
                     f"{clock(e.end)}), {e.windows} window{'s' if e.windows != 1 else ''}: {e.text}"
                     + (f"; picture: {where}" if where else ""))
    lines += ["", "## Pictures", ""]
    if not report.pictures:
        lines.append("Redis holds no picture of this range.")
    for p in report.pictures:
        lines.append(f"- window {p.window}, {wall_clock(p.wall_time)} (video {clock(p.start)}-{clock(p.end)}): "
                     f"{picture(p)}")
    return "\n".join(lines) + "\n"
