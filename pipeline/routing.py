"""The driver's side of questions and control messages: ad-hoc questions go to the model
worker that holds their stream, add/remove requests change the running pipeline, and every
reply is written in order once Redis takes it (an outage delays replies, never loses them)."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import ray

from connectors.client import SlowFastClient
from connectors.intake import ControlIntake, QuestionIntake
from connectors.redis_conn import UNREACHABLE
from connectors.redis_schema import (
    PAST_KINDS, Answer, AnswerKind, ControlAction, InvalidMessage, Question, QuestionKind,
)

from .config import StreamConfig
from .engine.output_processor import error_answer
from .history import answer_history, answer_report
from .resume import summary_every
from .running import Pipeline
from .summaries import default_summary_every

POLL_MS = 200
FINAL_ANSWER_WAIT_S = 30.0


class Router:
    def __init__(self, redis_url: str, pipeline: Pipeline, on_event: Callable[[str], None]):
        consumer = f"driver-{socket.gethostname()}"
        self.questions = QuestionIntake(redis_url, consumer_name=consumer)
        self.controls = ControlIntake(redis_url, consumer_name=consumer)
        self.pipeline, self.on_event = pipeline, on_event
        self.pending: dict[Any, tuple[str, Question]] = {}  # a worker's answer ref -> (entry id, question)
        self.replies: deque[Callable[[], object]] = deque()  # written in order once Redis takes them
        # Questions about the past and reports read Redis and call the model several times: off
        # the routing loop, two at a time.
        self.past_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sfs-past")
        self.past: dict[Future, tuple[str, Question]] = {}
        self.redis_url = redis_url

    def poll(self) -> None:
        """One round: send what waits, route new questions and controls, collect answers.
        Raises an UNREACHABLE error while Redis is down (the caller backs off); answers the
        workers finished are queued first, so an outage delays their replies and loses none."""
        self._finish_answers(wait_s=0)
        self._send_replies()
        self._route_questions()
        self._handle_controls()
        self._finish_answers(wait_s=0)
        self._send_replies()

    def close(self) -> None:
        """At the stop: the answers still being worked on, then every reply Redis takes."""
        self._finish_answers(wait_s=FINAL_ANSWER_WAIT_S)
        self.past_executor.shutdown(wait=False, cancel_futures=True)
        try:
            self._send_replies()
        except UNREACHABLE:
            self.on_event(f"redis unreachable at exit: {len(self.replies)} question/control replies not delivered")
        self.questions.close()
        self.controls.close()

    def _route_questions(self) -> None:
        intake = self.questions
        # New entries are routed before the reclaim is read: if Redis goes away in between, an
        # entry already read (pending in its group) would otherwise wait for the next reclaim.
        for read in (lambda: intake.poll(block_ms=POLL_MS, count=16), lambda: intake.reclaim(count=16)):
            for entry_id, question in read():
                if not isinstance(question, InvalidMessage):  # else the intake replied with the error
                    self._route_question(entry_id, question)

    def _route_question(self, entry_id: str, question: Question) -> None:
        if question.kind in PAST_KINDS:
            self.past[self.past_executor.submit(self._answer_past, question)] = (entry_id, question)
            return
        handle = self.pipeline.streams.get(question.stream)
        if handle is None or handle.split:
            error = error_answer(question, f"stream {question.stream!r} is not running" if handle is None else
                                 f"stream {question.stream!r} is a file split over the model workers: it has "
                                 "no latest window; ask about its history")
            self._queue_reply(entry_id, question, error)
            return
        self.pending[self.pipeline.workers[handle.worker_index].answer.remote(question)] = (entry_id, question)

    def _answer_past(self, question: Question) -> Answer:
        """A question about the stream's past, or a report: read from Redis, answered by the model
        worker that holds the stream (any worker for a stream that no longer runs)."""
        handle = self.pipeline.streams.get(question.stream)
        worker = self.pipeline.workers[handle.worker_index if handle is not None else 0]
        model = Path(str(self.pipeline.model_path)).name

        def ask(prompts: Sequence[str]) -> list[str]:
            return ray.get(worker.answer_texts.remote(list(prompts)))

        with SlowFastClient(self.redis_url) as client:
            if question.kind == QuestionKind.HISTORY:
                return answer_history(client, question, ask, model)
            config = self.pipeline.config
            every = summary_every(handle.config, config) if handle is not None else \
                default_summary_every(config.window, config.stride, config.fps)
            return answer_report(client, question, ask, every, model)

    def _finish_answers(self, wait_s: float) -> None:
        """Queue the replies of the questions the workers have answered."""
        if self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=wait_s)
            for ref in ready:
                entry_id, question = self.pending.pop(ref)
                try:
                    answer = ray.get(ref)
                except Exception as exc:  # a worker that died mid-question still owes a reply
                    answer = error_answer(question, f"answering failed: {type(exc).__name__}: {exc}")
                self._queue_reply(entry_id, question, answer)
        if self.past:
            done, _ = wait(list(self.past), timeout=wait_s)
            for future in done:
                entry_id, question = self.past.pop(future)
                try:
                    answer = future.result()
                except UNREACHABLE as exc:  # Redis went away mid-read: the reply waits for it like the others
                    answer = error_answer(question, f"Redis unreachable while reading the history: {exc}")
                except Exception as exc:  # a bad range, a model failure: this request only
                    answer = error_answer(question, f"answering failed: {type(exc).__name__}: {exc}")
                answer = answer.model_copy(update={"kind": AnswerKind(question.kind)})
                self._queue_reply(entry_id, question, answer)

    def _queue_reply(self, entry_id: str, question: Question, answer: Answer) -> None:
        self.replies.append(lambda e=entry_id, q=question, a=answer: self.questions.complete(e, q, a))

    def _send_replies(self) -> None:
        """Write queued replies in order; one that fails (Redis unreachable) stays first in line."""
        while self.replies:
            self.replies[0]()
            self.replies.popleft()

    def _handle_controls(self) -> None:
        for entry_id, control in self.controls.poll(block_ms=0, count=8):
            if isinstance(control, InvalidMessage):
                continue
            error = None
            try:
                if control.action == ControlAction.ADD:
                    if not control.source:
                        raise ValueError("add needs a source")
                    stream = StreamConfig(id=control.stream, source=control.source, live=control.live, **control.config)
                    self.pipeline.add_stream(stream)
                else:
                    self.pipeline.remove_stream(control.stream)
                self.on_event(f"control: {control.action} {control.stream}")
            except UNREACHABLE:
                raise
            except Exception as exc:  # a bad request affects only itself
                error = str(exc)
            self.replies.append(lambda e=entry_id, c=control, err=error: self.controls.complete(e, c, err))
