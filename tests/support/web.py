"""The web app on a real socket (uvicorn in a thread) against the test's Redis, and headless
Debian Chromium driven by Playwright (no browser download: the system executable)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest

from connectors.intake import QuestionIntake
from connectors.redis_schema import Answer, Question
from pipeline.web.server import WebServer
from tests.support.system_parts import missing_part

__all__ = ["web_server", "browser", "answerer", "CHROMIUM"]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def web_server(redis_url: str) -> Iterator[WebServer]:
    server = WebServer(redis_url, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if shutil.which("chromium") is None:
        missing_part("Debian's chromium", "make system-deps")
    try:
        import playwright.sync_api as playwright_api
    except ImportError:
        missing_part("playwright", "pip install -e '.[test]'")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class IntakeAnswerer:
    """Answers questions from the real intake as the pipeline does, without a model: the
    answer repeats the question; a question containing "fail" gets an error reply."""

    def __init__(self, redis_url: str) -> None:
        self.intake = QuestionIntake(redis_url, consumer_name="test-answerer")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for entry_id, question in self.intake.poll(block_ms=200):
                if not isinstance(question, Question):
                    continue  # the intake already replied with the error
                base = dict(question_id=question.id, stream=question.stream, question=question.text)
                if "fail" in question.text:
                    answer = Answer(**base, error="model failure: out of memory")
                else:
                    answer = Answer(**base, window=3, start=12.0, end=27.75, text=f"Yes: {question.text}",
                                    probability=0.75 if question.kind == "yesno" else None)
                self.intake.complete(entry_id, question, answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.intake.close()


@pytest.fixture
def answerer(redis_url: str) -> Iterator[IntakeAnswerer]:
    a = IntakeAnswerer(redis_url)
    try:
        yield a
    finally:
        a.close()
