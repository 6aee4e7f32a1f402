"""A live camera's windows with events and a gated window, published through the contract as
the pipeline does (for the page's and the CLI's tests)."""

from __future__ import annotations

import time

import numpy as np

from connectors.publisher import Publisher
from connectors.redis_schema import EventPhase, IngestState, StreamInfo, StreamStatus
from pipeline.pictures import window_picture
from tests.support.records import make_caption, make_event

__all__: list[str] = []  # helpers only (tests/conftest.py star-imports fixture modules)

QUESTION = "Is a vehicle at the gate?"


def seed_events(redis_url: str, sid: str = "gate") -> dict:
    """Windows 0-5 of a live camera: an event opens on 1 and closes on 2; another opens on 3, is
    seen again on 4 and is still open; window 5 is gated (unchanged since window 4)."""
    now = time.time()
    with Publisher(redis_url) as pub:
        run = pub.register_stream(StreamInfo(id=sid, source="rtsp://10.0.0.7/stream1")).run
        wall = {w: now - (6 - w) * 4.0 for w in range(6)}

        def record(window: int, phase: EventPhase, first: int, text: str = "Yes, a white van.") -> object:
            return make_event(window, stream=sid, run=run, question_id="vehicle", question=QUESTION, text=text,
                              phase=phase, first_window=first, opened_at=wall[first], wall_end=wall[window])

        events = {1: [record(1, EventPhase.OPENED, 1)], 2: [record(2, EventPhase.CLOSED, 1, "No.")],
                  3: [record(3, EventPhase.OPENED, 3, "Yes, a truck.")],
                  4: [record(4, EventPhase.UPDATED, 3, "Yes, a truck.")]}
        for w in range(6):
            fields = dict(stream=sid, run=run, wall_start=wall[w] - 15.75, wall_end=wall[w], latency_s=0.4,
                          text=f"caption of window {w}")
            if w == 5:
                fields |= dict(text="caption of window 4", unchanged_since_window=4, unchanged_since=wall[4])
            caption = make_caption(w, **fields)
            image = np.full((96, 96, 3), 40 * w, dtype=np.uint8)
            pub.publish_window(caption, events=events.get(w, []), frame=window_picture(image, caption))
        pub.publish_status(StreamStatus(stream=sid, state=IngestState.LIVE, windows_done=6, windows_gated=1,
                                        events_opened=2, events_open=1, deliveries_failed=1,
                                        last_delivery_error="http://hooks/x: HTTP 503 Service Unavailable"))
    return {"run": run, "wall": wall, "closed": f"vehicle:{run}:1", "open": f"vehicle:{run}:3"}
