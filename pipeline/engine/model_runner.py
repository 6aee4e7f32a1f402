"""The model side of the engine: per-stream feature rings, the queries due on each window,
and one batched model call per batch that returns texts and first-token P(yes).

It knows no Redis and no files: windows in, replies out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model import SlowFastVLM, TextQuery, VideoQuery

from ..config import GenerationConfig, StandingQuestion, StreamConfig
from ..messages import Reply, WindowReplies
from ..window import FrameRef, FramesLost, Window

FrameFetcher = Callable[[Sequence[FrameRef]], list[np.ndarray]]  # raises FramesLost for frames that are gone


@dataclass
class FeatureRing:
    """One stream's frame features keyed by frame seq: each sampled frame is encoded once and
    reused by every overlapping window, then released as the window slides past it."""

    features: dict[int, torch.Tensor] = field(default_factory=dict)
    frames_encoded: int = 0
    frames_dropped: int = 0  # sampled frames no processed window covered
    last_frame_seq: int | None = None  # of the latest processed window; None after a restart
    latest: tuple[Window, torch.Tensor] | None = None  # ad-hoc questions ask about this window

    def restart(self) -> None:
        """The source starts over (its ingest actor restarted): frame numbering restarts too."""
        self.features.clear()
        self.last_frame_seq = None


class ModelRunner:
    def __init__(self, vlm: SlowFastVLM, generation: GenerationConfig, batch_size: int, fetch_frames: FrameFetcher):
        self.vlm, self.generation, self.batch_size, self.fetch_frames = vlm, generation, batch_size, fetch_frames
        self.streams: dict[str, StreamConfig] = {}
        self.rings: dict[str, FeatureRing] = {}

    def add_stream(self, config: StreamConfig) -> None:
        self.streams[config.id] = config
        self.rings[config.id] = FeatureRing()

    def remove_stream(self, stream: str) -> None:
        self.streams.pop(stream, None)
        self.rings.pop(stream, None)

    # ---- features ----------------------------------------------------------------
    def window_features(self, window: Window) -> torch.Tensor:
        """[T, tokens, hidden] for the window, encoding only frames not in the ring."""
        ring = self.rings[window.stream]
        # A local copy: a restarting ingest actor may clear the ring meanwhile (restart()).
        features = {f.seq: ring.features[f.seq] for f in window.frames if f.seq in ring.features}
        missing = [f for f in window.frames if f.seq not in features]
        if missing:
            try:
                images = np.stack(self.fetch_frames(missing))
            except FramesLost as exc:
                raise FramesLost(str(exc), window) from exc
            encoded = dict(zip((f.seq for f in missing), self.vlm.encode_frames(self.vlm.preprocess(images))))
            features |= encoded
            ring.features.update(encoded)
            ring.frames_encoded += len(missing)
        self._advance(ring, window)
        return torch.stack([features[f.seq] for f in window.frames])

    def skip_window(self, window: Window) -> None:
        """A window published without the model (unchanged scene): its frames count as covered."""
        ring = self.rings.get(window.stream)
        if ring is not None:
            self._advance(ring, window)

    @staticmethod
    def _advance(ring: FeatureRing, window: Window) -> None:
        """The window is processed: frames before it that no window covered are dropped, and
        features of frames it slid past are released."""
        first = window.frames[0].seq
        if ring.last_frame_seq is not None and first > ring.last_frame_seq + 1:
            ring.frames_dropped += first - ring.last_frame_seq - 1
        ring.last_frame_seq = max(ring.last_frame_seq or 0, window.frames[-1].seq)
        for seq in [s for s in ring.features if s < first]:
            del ring.features[seq]

    # ---- model calls ---------------------------------------------------------------
    def queries_due(self, window: Window) -> list[StandingQuestion | None]:
        """The queries due on a window: None for its caption, then its standing questions."""
        config = self.streams[window.stream]
        due: list[StandingQuestion | None] = [None] if window.seq % config.caption_every_n_windows == 0 else []
        return due + [q for q in config.standing_questions if window.seq % q.every_n_windows == 0]

    def run_windows(self, windows: Sequence[Window], text_prompts: Sequence[str] = (),
                    asked: Sequence[tuple[Window, str]] = ()) -> tuple[list[WindowReplies], list[Reply], list[Reply]]:
        """Every query due on these windows (a caption every `caption_every_n_windows`, each
        standing question every its `every_n_windows`), the ad-hoc questions `asked` about
        windows of the batch, and the text-only prompts, in one model call: a batch counts
        windows, each with all its queries. Returns the windows' replies, then the text
        prompts', then the ad-hoc questions'.
        Raises FramesLost (naming the window) if a window's frames are gone."""
        features = [self.window_features(w) for w in windows]
        due = [(index, question) for index, window in enumerate(windows) for question in self.queries_due(window)]
        # All of a window's queries hold its features object, so they share one prefill of it.
        queries = [self._query(features[i], q, self.streams[windows[i].stream]) for i, q in due]
        index_of = {id(w): i for i, w in enumerate(windows)}
        questions = [VideoQuery(features=features[index_of[id(w)]], question=text) for w, text in asked]
        replies = self._generate(queries + questions + [TextQuery(p) for p in text_prompts])
        results = []
        for index, window in enumerate(windows):
            own = [(q, r) for (i, q), r in zip(due, replies) if i == index]
            caption = next((r for q, r in own if q is None), None)
            results.append(WindowReplies(window, features[index], caption, [(q, r) for q, r in own if q is not None]))
        answers_end = len(queries) + len(questions)
        return results, replies[answers_end:], replies[len(queries):answers_end]

    def remember_latest(self, replies: WindowReplies) -> None:
        ring = self.rings.get(replies.window.stream)
        if ring is not None:
            ring.latest = (replies.window, replies.features)

    @staticmethod
    def _query(features: torch.Tensor, question: StandingQuestion | None, config: StreamConfig) -> VideoQuery:
        if question is None:
            return VideoQuery(features=features, question=config.caption_prompt)
        budget = 0 if question.answer == "probability" else None  # no decoding: P(yes) is the answer
        return VideoQuery(features=features, question=question.prompt, max_new_tokens=budget)

    def ask(self, features: torch.Tensor, question: str) -> Reply:
        (reply,) = self.run([VideoQuery(features=features, question=question)])
        return reply

    def run(self, queries: Sequence[VideoQuery | TextQuery]) -> list[Reply]:
        """Queries outside a window batch (final-summary rounds, questions): `batch_size` per call."""
        replies: list[Reply] = []
        for start in range(0, len(queries), self.batch_size):
            replies += self._generate(queries[start : start + self.batch_size])
        return replies

    def _generate(self, queries: Sequence[VideoQuery | TextQuery]) -> list[Reply]:
        g = self.generation
        outputs = self.vlm.generate(
            list(queries), max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
            repetition_penalty=g.repetition_penalty, decode_cross_attention=g.decode_cross_attention,
        )
        return [Reply(o.text if q.max_new_tokens != 0 else yes_or_no(o.yes_probability), o.yes_probability)
                for q, o in zip(queries, outputs)]


def yes_or_no(probability: float) -> str:
    """The one-token answer a probability-only question reads as."""
    return "Yes" if probability >= 0.5 else "No"
