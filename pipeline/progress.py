"""How far a run of files is: the windows each file will give, and those captioned before
(a resumed run), for the progress bars."""

from __future__ import annotations

import contextlib

import av

from connectors.client import SlowFastClient

from .config import PipelineConfig, StreamConfig
from .resume import ResumeRefused, resume_point
from .window import expected_windows


def file_seconds(source: str) -> float | None:
    """A file's duration as its container says (None if it cannot be read here)."""
    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            return float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
    except Exception:  # the run itself reports unreadable sources
        return None


def estimated_windows(source: str, config: PipelineConfig) -> int | None:
    """Windows a file will give, from its duration (None if it cannot be read here)."""
    seconds = file_seconds(source)
    return None if seconds is None else expected_windows(round(seconds * config.fps), config.window, config.stride)


def resumed_windows(config: PipelineConfig, streams: list[StreamConfig]) -> dict[str, int]:
    """Windows already captioned of the files that resume (they start the progress bars)."""
    if not config.redis_url:
        return {}
    done = {}
    with SlowFastClient(config.redis_url) as client:
        for stream in streams:
            with contextlib.suppress(ResumeRefused):  # refused before this; the run reports it
                point = resume_point(client, stream, False, config)
                if point is not None:
                    done[stream.id] = point.next_window
    return done
