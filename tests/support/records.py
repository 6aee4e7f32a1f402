"""Redis records for tests: captions and events of released-shape windows (64 frames at
4 fps, stride 16: a window starts every 4 s and spans 15.75 s)."""

from __future__ import annotations

from connectors.redis_schema import Caption, Event, event_id

RUN = 1_700_000_000_000
WINDOW_START_S, WINDOW_SPAN_S, WALL_ORIGIN = 4.0, 15.75, 1.7e9


def make_caption(window: int = 0, *, stream: str = "cam1", run: int = RUN, **fields: object) -> Caption:
    start = WINDOW_START_S * window
    base = dict(
        stream=stream, window=window, run=run, start=start, end=start + WINDOW_SPAN_S,
        wall_start=WALL_ORIGIN + start, wall_end=WALL_ORIGIN + start + WINDOW_SPAN_S,
        text=f"window {window}", model="tiny",
    )
    return Caption(**(base | fields))  # type: ignore[arg-type]


def make_event(window: int = 0, *, stream: str = "cam1", run: int = RUN, **fields: object) -> Event:
    """By default the record of an event that opens on `window`."""
    start = WINDOW_START_S * window
    question_id = str(fields.get("question_id", "bay"))
    first_window = fields.get("first_window", window)
    wall_end = fields.get("wall_end", WALL_ORIGIN + start + WINDOW_SPAN_S)
    base = dict(
        stream=stream, window=window, run=run, question_id=question_id, question="anyone?", text="Yes",
        probability=0.9, trigger="p_yes>0.8", start=start, end=start + WINDOW_SPAN_S, wall_end=wall_end,
        first_window=first_window, event_id=event_id(question_id, run, first_window),
        opened_at=wall_end - WINDOW_START_S * (window - first_window),
    )
    return Event(**(base | fields))  # type: ignore[arg-type]
