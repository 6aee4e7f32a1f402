"""Resuming a file's stream after an interruption, and starting it over (no Ray).

A file stream whose captions are in Redis continues its run after the last captioned
window, provided it is the same source with the same window settings (both recorded in the
registry); anything else under the same id is refused, since its windows would not line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import SummaryKind, window_entry_id
from connectors.sources import SourceError, redact_uri

from .config import PipelineConfig, StreamConfig
from .summaries import MAX_PENDING_FACTOR, default_summary_every

OUTPUT_FILES = ("captions.jsonl", "captions.vtt", "summary.md")


@dataclass(frozen=True)
class EarlierOutputs:
    """What a stream continuing its run already has in Redis (a restarted worker, a resumed file)."""

    captions: Sequence[Any] = ()  # every caption of the run, for the files
    summaries: Sequence[Any] = ()  # its rolling summaries so far
    since_summary: Sequence[Any] = ()  # the captions after the last of them
    open_events: Sequence[Any] = ()  # its events still open


class ResumeRefused(ValueError):
    """The stream id has captions of another source or other window settings."""


@dataclass(frozen=True)
class ResumePoint:
    run: int
    next_window: int  # windows below this are done


def window_settings(config: PipelineConfig) -> dict[str, float]:
    return {"window": config.window, "stride": config.stride, "fps": config.fps}


def _describe(settings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(settings.items())) or "unrecorded window settings"


def resume_point(client: SlowFastClient, stream: StreamConfig, live: bool, config: PipelineConfig) -> ResumePoint | None:
    """Where a file stream continues (None: from the start). Raises ResumeRefused."""
    info = client.stream(stream.id)
    if live or info is None or info.live:
        return None
    last = next((c for c in reversed(client.history(stream.id, count=1)) if c.run == info.run), None)
    if last is None:
        return None
    source = redact_uri(stream.source)
    wanted = window_settings(config)
    if info.source != source:
        raise ResumeRefused(
            f"stream {stream.id!r} already has {last.window + 1} windows captioned from {info.source}, not {source}: "
            "use another id, or --restart to start over"
        )
    if info.window_settings != wanted:
        raise ResumeRefused(
            f"stream {stream.id!r} was captioned with {_describe(info.window_settings)}, this run has "
            f"{_describe(wanted)}: use the same settings to resume, another id, or --restart to start over"
        )
    return ResumePoint(run=info.run, next_window=last.window + 1)


def restart_stream(redis_url: str, stream_id: str, out_dir: Path) -> str:
    """Delete the stream's Redis keys and output files; says what went."""
    with Publisher(redis_url) as publisher:
        keys = publisher.forget_stream(stream_id)
    removed = []
    for name in OUTPUT_FILES:
        path = out_dir / stream_id / name
        if path.exists():
            path.unlink()
            removed.append(name)
    files = ", ".join(removed) if removed else "no files"
    return f"restart: cleared stream {stream_id} ({keys} Redis keys; {files})"


def summary_every(stream: StreamConfig, config: PipelineConfig) -> int:
    """Windows per rolling summary of the stream (0: none)."""
    every = stream.summary_every_n_windows
    return default_summary_every(config.window, config.stride, config.fps) if every is None else every


def earlier_outputs(config: PipelineConfig, stream: str, run: int, live: bool, every: int) -> EarlierOutputs:
    """What a stream continuing its run (a restarted worker, a resumed file) already has in
    Redis: a file's captions of this run, in window order, for its files; its rolling
    summaries so far and the captions after the last one."""
    with SlowFastClient(config.redis_url) as client:
        def this_run(captions):
            return [c for c in captions if c.run == run]

        # Every caption of the run that Redis holds. Trimming is approximate (up to ~100 more than
        # history_len), and the newest are what a killed worker's files may lack: the first
        # history_len of them lost the last few windows of a file whose worker was killed.
        captions = [] if live else this_run(client.history(stream, since=f"{run - 1}-0", count=None))
        open_events = [e for e in client.open_events(stream) if e.run == run]
        if not every:
            return EarlierOutputs(captions=captions, open_events=open_events)
        done = [s for s in client.summaries(stream, count=config.history_len)
                if s.run == run and s.kind == SummaryKind.ROLLING]
        after = window_entry_id(run, done[-1].last_window) if done else f"{run - 1}-0"
        since = this_run(client.history(stream, since=after, count=MAX_PENDING_FACTOR * every + 16))
    return EarlierOutputs(captions=captions, summaries=done, since_summary=since, open_events=open_events)


def prepare_resume(config: PipelineConfig, restart: bool) -> list[str]:
    """Before a run starts: with `restart`, clear the streams' keys and files (returns what went,
    a line per stream); otherwise refuse (ResumeRefused) a file whose id has captions of another
    source or other window settings."""
    if restart:
        return [restart_stream(config.redis_url, s.id, config.out_dir) for s in config.streams if config.redis_url]
    if not config.redis_url:
        return []  # an embedded Redis starts empty: nothing to resume
    with SlowFastClient(config.redis_url) as client:
        for stream in config.streams:
            try:
                resume_point(client, stream, stream.is_live(), config)
            except SourceError:
                pass  # the run reports a source that cannot work, for that stream alone
    return []
