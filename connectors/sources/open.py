"""open_source: the one entry point that builds a VideoSource from a URI and options."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .backoff import Backoff
from .decoder import OpenSettings
from .scaling import Scaler
from .seeking import SamplePlan
from .source import VideoSource
from .types import SourceError
from .uri import Kind, parse_source

TRANSPORTS = ("tcp", "udp")


def open_source(
    uri: str | os.PathLike[str],
    fps: float = 4.0,
    size: int | None = 576,
    *,
    frames: int | None = None,
    crop: bool = True,
    interpolation: str = "BICUBIC",
    loop: bool = False,
    realtime: bool = True,
    live: bool | None = None,
    transport: str = "tcp",
    open_timeout: float = 10.0,
    read_timeout: float = 10.0,
    backoff_initial: float = 0.5,
    backoff_max: float = 30.0,
    backoff_jitter: float = 0.2,
    max_attempts: int | None = None,
    retry_connect: bool = False,
    skip_nonref: bool = False,
    plan: SamplePlan | None = None,
    first_frame: int = 0,
    av_options: Mapping[str, str] | None = None,
) -> VideoSource:
    """Open a video source and connect to it (SourceError if it cannot start).

    fps: target rate by presentation time; frames: instead, exactly N frames spread
    uniformly over a file. size: shortest edge, then a size x size center crop (crop=False
    keeps the aspect ratio; size=None keeps the native resolution). loop / loop://PATH:
    replay a file forever (at real time unless realtime=False) as a fake live camera.
    live: override live detection. transport, timeouts, backoff_*, max_attempts
    (None: forever) govern live sources; skip_nonref: with fps at most a quarter of the frame
    rate, FFmpeg skips decoding frames no other frame refers to (B-frames, usually; each sample
    is then the first reference frame at or after its tick, with its own true timestamp, and
    source_index counts decoded frames only); retry_connect: a live source that is down at
    start keeps retrying (state connecting) instead of raising. plan (scan_samples of the
    file at this fps) with first_frame: start at that sampled frame, as a single pass would
    sample it and number it (seq), seeking instead of decoding what comes before; a frame
    that differs from the scan is a SourceError naming PLAN_MISMATCH (source_index then
    counts from the seek). av_options: extra FFmpeg options passed to av.open.
    """
    spec = parse_source(uri, loop=loop)
    if transport not in TRANSPORTS:
        raise SourceError(spec.uri, f"rtsp transport must be one of {TRANSPORTS}, not {transport!r}")
    if frames is not None and frames < 1:
        raise SourceError(spec.uri, "frames must be >= 1")
    if frames is None and not fps > 0:
        raise SourceError(spec.uri, "fps must be > 0")
    if open_timeout <= 0 or read_timeout <= 0:
        raise SourceError(spec.uri, "timeouts must be > 0")
    if plan is not None and (frames is not None or live or spec.kind is not Kind.FILE or plan.fps != fps):
        raise SourceError(spec.uri, "a sample plan needs a local file read at the plan's fps")
    if plan is not None and not 0 <= first_frame < plan.frames:
        raise SourceError(spec.uri, f"first_frame {first_frame} is not one of the plan's {plan.frames} frames")
    try:
        backoff = Backoff(backoff_initial, backoff_max, backoff_jitter, max_attempts)
        scaler = Scaler(size, crop, interpolation)
    except ValueError as exc:
        raise SourceError(spec.uri, str(exc)) from None
    source = VideoSource(
        spec,
        fps=fps,
        frames=frames,
        scaler=scaler,
        settings=OpenSettings(transport, open_timeout, read_timeout, dict(av_options or {})),
        backoff=backoff,
        live=live,
        realtime=realtime,
        retry_connect=retry_connect,
        skip_nonref=skip_nonref,
        plan=plan,
        first_frame=first_frame,
    )
    return source.start()
