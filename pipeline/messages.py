"""What the pipeline's processes tell each other, typed: an ingest actor's report to its
model worker, a worker's counts per stream, the model's replies to a window (a split file's
segments send them to its merge), and what a run did with each stream.

Plain dataclasses (they pickle across Ray as they are); each field is read by name on the
other side, so a renamed field fails at once instead of reading None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from connectors.redis_schema import IngestState

if TYPE_CHECKING:  # annotations only: ingest actors import this module and never load torch
    import torch

    from .config import StandingQuestion
    from .window import Window


@dataclass(frozen=True)
class IngestReport:
    """The ingest actor's side of a stream's status, sent every STATUS_INTERVAL_S (and once
    more, `final`, when the source is over); the worker publishes it with its own counts."""

    state: IngestState
    live: bool
    frames_in: int = 0
    fps_in: float = 0.0
    frames_corrupt: int = 0  # corrupt packets and frames the decoder skipped
    windows_emitted: int = 0
    reconnects: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    final: bool = False

    @property
    def file_ended(self) -> bool:
        """A file whose every window has its outcome: time for its final summary."""
        return self.final and not self.live and self.state is IngestState.ENDED


@dataclass(frozen=True)
class Reply:
    text: str
    yes_probability: float  # P(yes) / (P(yes) + P(no)) of the first answer token, same forward


@dataclass(frozen=True)
class WindowReplies:
    """A window's features and the replies of every query due on it."""

    window: Window
    features: torch.Tensor
    caption: Reply | None  # None: no caption due on this window
    standing: list[tuple[StandingQuestion, Reply]]


@dataclass(frozen=True)
class StreamStats:
    """A model worker's counts for one stream."""

    frames_encoded: int = 0  # each sampled frame once, however many windows hold it
    ring_size: int = 0  # frame features kept for the next windows
    frames_dropped: int = 0  # sampled frames no processed window covered (their windows were skipped)
    windows_done: int = 0
    windows_skipped: int = 0
    windows_failed: int = 0
    windows_gated: int = 0  # of windows_done, published unchanged without the model
    events_opened: int = 0
    events_open: int = 0
    deliveries_pending: int = 0  # event notifications not delivered yet
    deliveries_failed: int = 0  # event notifications given up on (written down)
    queued: int = 0
    summaries: int = 0
    summaries_skipped: int = 0


@dataclass(frozen=True)
class StreamSummary:
    """What a run did with one stream: the ingest's side, plus the worker's counts when the
    worker could still be asked (`stats` None: it died or did not answer at the stop)."""

    stream: str
    state: str  # an IngestState, or "failed" / "not finished" as the driver saw it
    live: bool | None = None
    frames_in: int = 0
    windows: int = 0
    error: str | None = None
    stats: StreamStats | None = None
