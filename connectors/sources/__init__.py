"""Video sources decoded with PyAV: files, RTSP cameras, HTTP files and HLS, looping files.

with open_source("rtsp://cam/stream", fps=4.0, size=576) as src:
    for frame in src:  # Frame(seq, pts, wall_time, source_index, image)
        ...
"""

from .backoff import Backoff
from .open import open_source
from .seeking import PLAN_MISMATCH, SamplePlan, scan_samples
from ..redact import redact_text, redact_uri
from .source import VideoSource
from .types import Frame, SourceError, SourceState, SourceStats

__all__ = [
    "Backoff",
    "Frame",
    "PLAN_MISMATCH",
    "SamplePlan",
    "SourceError",
    "SourceState",
    "SourceStats",
    "VideoSource",
    "open_source",
    "scan_samples",
    "redact_text",
    "redact_uri",
]
