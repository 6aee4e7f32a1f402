"""The engine a model worker runs: the scheduler decides what runs and what becomes of each
window, the model runner does the model work, the output processor publishes. No Ray.

Thread-safety: `submit`, `ingest_report` and the stats take a short lock and may run beside
a `step()` that is inside its model call; everything that calls the model (`step`,
`answer`) or changes the set of streams takes the model lock, one at a time. An ad-hoc
question asked while a window of its stream waits for the model rides that window's batch
(one prefill for the window's caption, standing questions and it); `answer` then waits for
the step instead of taking the model lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.publisher import Publisher
from connectors.redis_schema import Answer, Question, QuestionKind, StreamStatus
from model import SlowFastVLM, TextQuery

from ..config import PipelineConfig, StreamConfig
from ..messages import IngestReport, StreamStats
from ..notify import DeliveryStats, Notifier
from ..rates import RateMeter
from ..resume import EarlierOutputs
from ..scheduler import Batch, Outcome, Policy, Resolution, Scheduler
from ..window import FramesLost, Window
from .model_runner import FrameFetcher, ModelRunner
from .output_processor import OutputProcessor, Relay, error_answer, stream_files

log = logging.getLogger("slowfast.pipeline")


@dataclass(frozen=True)
class StepResult:
    """What one step decided: the outcome of each window it settled, and the windows it ran."""

    resolutions: list[Resolution]
    windows: list[Window] = field(default_factory=list)
    summarised: tuple[str, ...] = ()  # the file it worked on the end of (final summary, events closed)

    @property
    def streams(self) -> set[str]:
        """Streams whose status this step changed."""
        return ({w.stream for w in self.windows} | {r.item.lane for r in self.resolutions if r.item is not None}
                | set(self.summarised))


# How long an ad-hoc question waits for a batch to take it along before it is asked on its own.
RIDE_WAIT_S = 10.0


@dataclass(eq=False)
class _Rider:
    """An ad-hoc question waiting to ride its stream's next window through the model."""

    question: Question
    answer: Answer | None = None  # None once done: released, to be asked on its own
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, config: PipelineConfig, vlm: SlowFastVLM, publisher: Publisher, fetch_frames: FrameFetcher,
                 model_name: str, notifier: Notifier | None = None):
        """`notifier`: delivers the openings and closings of events (and counts them per stream)."""
        self.config, self.publisher, self.fetch_frames = config, publisher, fetch_frames
        self.notifier = notifier
        self.scheduler = Scheduler(config.batch_size)
        self.runner = ModelRunner(vlm, config.generation, config.batch_size, fetch_frames)
        self.outputs = OutputProcessor(publisher, model_name, self._picture,
                                       on_event=notifier.event if notifier is not None else None)
        self.reports: dict[str, IngestReport] = {}
        self.fps_out: dict[str, RateMeter] = {}
        self.files_ended: deque[str] = deque()  # files whose final summary is still to write
        self.riders: dict[str, list[_Rider]] = {}  # stream -> ad-hoc questions for its next window
        self._lock = threading.Lock()  # scheduler, reports: held briefly, never across a model call
        self._model_lock = threading.Lock()  # the model and the set of streams: one at a time

    # ---- streams -------------------------------------------------------------------
    def add_stream(self, stream: StreamConfig, run: int, live: bool, summary_every: int, next_window: int = 0,
                   earlier: EarlierOutputs = EarlierOutputs(), relay: Relay | None = None) -> None:
        """Take a stream; `next_window` > 0 continues its numbering (files append). `relay`: a
        segment of a split file, whose windows go there instead of being published."""
        stream = stream.model_copy(update={"live": live})
        files, summaries = stream_files(self.config, stream, run, summary_every, earlier) if relay is None else (None, None)
        with self._model_lock, self._lock:
            self.runner.add_stream(stream)
            self.outputs.add_stream(stream, run, files, summaries, earlier.open_events, relay)
            self.scheduler.add_lane(stream.id, Policy.NEWEST if live else Policy.ORDERED, next_window)
            self.fps_out[stream.id] = RateMeter()

    def remove_stream(self, stream: str) -> list[Resolution]:
        """Drop a stream (after its running batch): its waiting windows resolve REMOVED."""
        with self._model_lock, self._lock:
            resolutions = self.scheduler.remove_lane(stream)
            self.runner.remove_stream(stream)
            self.outputs.remove_stream(stream)
            self.reports.pop(stream, None)
            self.fps_out.pop(stream, None)
            self._release(self.riders.pop(stream, []))
            if stream in self.files_ended:
                self.files_ended.remove(stream)
        return resolutions

    def is_live(self, stream: str) -> bool:
        """Whether `stream` is a running live stream (its lane keeps only the newest windows)."""
        lane = self.scheduler.lanes.get(stream)
        return lane is not None and lane.policy is Policy.NEWEST

    @property
    def stream_count(self) -> int:
        return len(self.scheduler.lanes)

    def resume_point(self, stream: str) -> int | None:
        """For a (re)starting source: forget its frames (numbering restarts with the source) and
        return the next window number to use; None if the stream is not this engine's."""
        with self._lock:
            ring = self.runner.rings.get(stream)
            if ring is None:
                return None
            ring.restart()
            return self.scheduler.next_seq(stream)

    # ---- work ----------------------------------------------------------------------------
    def submit(self, window: Window, token: Any) -> list[Resolution]:
        """Offer a window; `token` resolves (via a later Resolution) once it is decided."""
        with self._lock:
            return self.scheduler.submit(window.stream, window.seq, window, token)

    def ingest_report(self, stream: str, report: IngestReport) -> None:
        with self._lock:
            if stream not in self.scheduler.lanes:
                return
            self.reports[stream] = report
            if report.file_ended and stream not in self.files_ended:
                self.files_ended.append(stream)  # every window is done: summarise the file

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and not self.files_ended

    def step(self) -> StepResult | None:
        """Run the next batch, or else one model call towards a file's final summary. None
        when there is nothing to do."""
        with self._lock:
            batch = self.scheduler.next_batch()
        if batch is None:
            return self._final_summary_step()
        with self._model_lock:
            lost, error = self._run(batch)
        with self._lock:
            if lost is not None:
                resolutions = self.scheduler.frames_lost(batch, lost, error)
            else:
                resolutions = self.scheduler.finished(batch, error)
        for resolution in resolutions:
            if resolution.outcome is Outcome.FAILED:
                self.outputs.window_failed(resolution.item.payload, resolution.error)
        return StepResult(resolutions, batch.payloads)

    def _run(self, batch: Batch) -> tuple[Any, str | None]:
        """Model call and outputs for a batch: (the item whose frames are gone, error) on failure.
        Windows the scene gate found unchanged skip the model (once there is a caption to repeat)."""
        windows = [w for w in batch.payloads if w.stream in self.runner.streams]
        unchanged = {id(w) for w in windows if w.gated and self.outputs.can_repeat(w.stream)}
        to_model = [w for w in windows if id(w) not in unchanged]
        riders = self._take_riders(windows, to_model)
        try:
            return self._run_model(batch, windows, unchanged, to_model, riders)
        finally:
            self._release([rider for _, rider in riders])  # those the call did not answer

    def _take_riders(self, windows: list[Window], to_model: list[Window]) -> list[tuple[Window, _Rider]]:
        """The ad-hoc questions that ride this batch, each on its stream's newest window in it.
        Those of a stream whose windows here are all unchanged (no model call) are released."""
        newest = {w.stream: w for w in to_model}
        with self._lock:
            for stream in {w.stream for w in windows} - newest.keys():
                self._release(self.riders.pop(stream, []))
            return [(newest[s], rider) for s in newest for rider in self.riders.pop(s, [])]

    @staticmethod
    def _release(riders: Sequence[_Rider]) -> None:
        for rider in riders:
            rider.done.set()

    def _run_model(self, batch: Batch, windows: list[Window], unchanged: set[int], to_model: list[Window],
                   riders: list[tuple[Window, _Rider]]) -> tuple[Any, str | None]:
        # Rolling summaries take the batch's free window slots, never a window's place.
        summary_tasks = self.outputs.due_summaries(room=self.config.batch_size - len(windows))
        try:
            replies, summary_replies, asked = ([], [], [])
            if to_model or summary_tasks:
                replies, summary_replies, asked = self._model_call(to_model, summary_tasks, riders)
        except FramesLost as exc:  # not the model's fault: the scheduler re-queues or drops it
            self.outputs.summaries_abandoned(summary_tasks)
            log.warning("window %d of %s: %s", exc.window.seq, exc.window.stream, exc)
            return next(i for i in batch.items if i.payload is exc.window), str(exc)
        except Exception as exc:  # one bad batch must not stop the worker: retried, then failed
            self.outputs.summaries_abandoned(summary_tasks)
            log.exception("processing failed for windows %s", [(w.stream, w.seq) for w in windows])
            return None, f"{type(exc).__name__}: {exc}"
        for (window, rider), reply in zip(riders, asked):
            rider.answer = self.outputs.adhoc_answer(rider.question, window, reply,
                                                     with_probability=rider.question.kind == QuestionKind.YESNO)
            rider.done.set()
        by_window = {id(r.window): r for r in replies}
        try:
            self.outputs.summaries_done(summary_tasks, [r.text for r in summary_replies])
            for window in windows:  # in batch order: a stream's windows publish in sequence
                if id(window) in unchanged:
                    self.outputs.window_unchanged(window)
                    self.runner.skip_window(window)
                else:
                    self.outputs.window_done(by_window[id(window)])
                    self.runner.remember_latest(by_window[id(window)])
        except Exception as exc:
            log.exception("publishing failed for windows %s", [(w.stream, w.seq) for w in windows])
            return None, f"{type(exc).__name__}: {exc}"
        return None, None

    def _model_call(self, to_model: list[Window], summary_tasks: list, riders: list[tuple[Window, _Rider]]):
        asked = [(window, rider.question.text) for window, rider in riders]
        prompts = [t.prompt for t in summary_tasks]
        try:
            return self.runner.run_windows(to_model, prompts, asked)
        except ValueError:  # ModelInputError: a question the model refuses must not fail the windows
            if not asked:
                raise
            self._release([rider for _, rider in riders])
            riders.clear()  # asked on their own, where a refusal is their error reply
            return self.runner.run_windows(to_model, prompts)

    def _final_summary_step(self) -> StepResult | None:
        if not self.files_ended:
            return None
        stream = self.files_ended[0]
        with self._model_lock:
            try:
                self.outputs.close_open_events(stream)
                tasks = self.outputs.final_summary_tasks(stream)
                if tasks:
                    replies = self.runner.run([TextQuery(t.prompt) for t in tasks])
                    self.outputs.final_summary_results(stream, tasks, [r.text for r in replies])
            except Exception:  # the captions are done; a failed summary must not stop the worker
                log.exception("final summary of %s failed", stream)
                tasks = []
        if not tasks:
            with self._lock:
                if self.files_ended and self.files_ended[0] == stream:
                    self.files_ended.popleft()
        return StepResult([], summarised=(stream,))

    def _picture(self, window: Window):
        """The window's last frame, or None if it is gone (its ingest actor died after the
        frame was encoded): a window is never lost for want of its picture."""
        try:
            (image,) = self.fetch_frames(window.frames[-1:])
        except FramesLost as exc:
            log.warning("window %d of %s published without a picture: %s", window.seq, window.stream, exc)
            return None
        return image

    # ---- ad-hoc questions ------------------------------------------------------------------
    def answer(self, question: Question) -> Answer:
        """Answer on the stream's next window when one waits for the model (sharing its
        prefill), else on its latest window; or an error reply saying why not."""
        rider = _Rider(question)
        with self._lock:
            riding = self.scheduler.waiting(question.stream) > 0
            if riding:
                self.riders.setdefault(question.stream, []).append(rider)
        if riding:
            rider.done.wait(RIDE_WAIT_S)
            with self._lock:
                waiting = self.riders.get(question.stream, [])
                if rider in waiting:  # no batch took it in time: asked on its own
                    waiting.remove(rider)
                    rider.done.set()
            rider.done.wait()  # a step that took it answers or releases it when its call ends
            if rider.answer is not None:
                return rider.answer
        with self._model_lock:
            if question.stream not in self.runner.streams:
                return error_answer(question, f"stream {question.stream!r} is not running")
            latest = self.runner.rings[question.stream].latest
            if latest is None:
                return error_answer(question, f"stream {question.stream!r} has no window yet")
            window, features = latest
            try:
                reply = self.runner.ask(features, question.text)
            except ValueError as exc:  # ModelInputError: the question itself is unusable
                return error_answer(question, str(exc), window)
        return self.outputs.adhoc_answer(question, window, reply, with_probability=question.kind == QuestionKind.YESNO)

    def answer_texts(self, prompts: Sequence[str]) -> list[str]:
        """Text-only prompts (questions about the past, reports), a batch at a time between steps:
        a long report never holds the model away from the windows for more than one batch."""
        texts: list[str] = []
        for start in range(0, len(prompts), self.config.batch_size):
            with self._model_lock:
                chunk = prompts[start: start + self.config.batch_size]
                texts += [reply.text for reply in self.runner.run([TextQuery(p) for p in chunk])]
        return texts

    # ---- what it reports -----------------------------------------------------------------------
    def stats(self, stream: str) -> StreamStats | None:
        with self._lock:
            counts, ring = self.scheduler.counts(stream), self.runner.rings.get(stream)
            outputs = self.outputs.streams.get(stream)
            if counts is None or ring is None or outputs is None:
                return None
            summaries = outputs.summaries
            deliveries = self._deliveries(stream)
            return StreamStats(
                frames_encoded=ring.frames_encoded, ring_size=len(ring.features), frames_dropped=ring.frames_dropped,
                windows_done=counts.done, windows_skipped=counts.skipped, windows_failed=counts.failed,
                windows_gated=outputs.windows_gated, events_opened=outputs.events_opened,
                events_open=len(outputs.open_events), deliveries_pending=deliveries.pending,
                deliveries_failed=deliveries.failed,
                queued=self.scheduler.waiting(stream), summaries=len(summaries.done) if summaries else 0,
                summaries_skipped=summaries.skipped if summaries else 0,
            )

    def _deliveries(self, stream: str) -> DeliveryStats:
        return self.notifier.stream_stats(stream) if self.notifier is not None else DeliveryStats()

    def all_stats(self) -> dict[str, StreamStats]:
        return {sid: stats for sid in list(self.scheduler.lanes) if (stats := self.stats(sid)) is not None}

    def status(self, stream: str) -> StreamStatus | None:
        """The stream's status as published: the ingest's report with the engine's counts; None
        until the ingest has reported."""
        stats, report = self.stats(stream), self.reports.get(stream)
        counts = self.scheduler.counts(stream)
        ring, outputs = self.runner.rings.get(stream), self.outputs.streams.get(stream)
        if stats is None or report is None or counts is None or ring is None or outputs is None:
            return None
        deliveries = self._deliveries(stream)
        error, error_at = report.last_error, report.last_error_at
        if error is None and counts.last_error is not None:
            error, error_at = counts.last_error, counts.last_error_at
        latest = ring.latest
        return StreamStatus(
            stream=stream, state=report.state, frames_in=report.frames_in, fps_in=report.fps_in,
            fps_out=self.fps_out[stream].update(stats.frames_encoded), frames_dropped=stats.frames_dropped,
            frames_corrupt=report.frames_corrupt, windows_emitted=report.windows_emitted,
            windows_done=stats.windows_done, windows_skipped=stats.windows_skipped, windows_gated=stats.windows_gated,
            windows_failed=stats.windows_failed, reconnects=report.reconnects, latency_s=outputs.latency_s,
            last_error=error, last_error_at=error_at,
            lag_s=max(0.0, time.time() - latest[0].wall_end) if latest and report.live else 0.0,
            summaries_skipped=stats.summaries_skipped, events_opened=stats.events_opened,
            events_open=stats.events_open, deliveries_pending=stats.deliveries_pending,
            deliveries_failed=stats.deliveries_failed, last_delivery_error=deliveries.last_error,
            last_delivery_error_at=deliveries.last_error_at,
        )

    def publish_status(self, stream: str) -> StreamStatus | None:
        """Publish the stream's status; returns it (None until the ingest has reported)."""
        status = self.status(stream)
        if status is not None:
            self.publisher.publish_status(status)
        return status

    def flush(self) -> bool:
        """Try to hand the publisher's offline buffer to Redis; True when it is empty."""
        return self.publisher.flush()
