"""The history panels of the pages in headless Chromium against a real Redis and web server:
search on the grid and on a stream's page, a question about the past and a report, every text
from Redis shown as text (the page's CSP is bypassed: the escaping must hold by itself)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from connectors.intake import QuestionIntake
from connectors.publisher import Publisher
from connectors.redis_schema import Answer, AnswerKind, EntryKind, Hit, Question, Report, StreamInfo
from pipeline.pictures import window_picture
from tests.support.records import make_caption, make_event

HOSTILE = '<img src=x onerror="window.__pwned = 1"> red circle <script>window.__pwned = 2</script>'


def seed(redis_url: str) -> None:
    now = time.time()
    with Publisher(redis_url) as pub:
        for sid, texts in {"gate": ["a red circle moves left.", HOSTILE, "a yellow square moves down."],
                           "yard": ["a red circle stays still."]}.items():
            info = pub.register_stream(StreamInfo(id=sid, source="rtsp://10.0.0.1/x"))
            for w, text in enumerate(texts):
                caption = make_caption(w, stream=sid, run=info.run, text=text, wall_end=now - 60 + w)
                events = [make_event(w, stream=sid, run=info.run, question="Is there a red circle?",
                                     wall_end=caption.wall_end)] if w == 0 else []
                pub.publish_window(caption, events=events,
                                   frame=window_picture(np.full((64, 64, 3), 90, np.uint8), caption))


class HistoryAnswerer:
    """Answers history and report requests from the real intake with hostile text, as a
    pipeline whose model wrote markup would."""

    def __init__(self, redis_url: str) -> None:
        self.intake = QuestionIntake(redis_url, consumer_name="test-history")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        source = Hit(stream="gate", kind=EntryKind.CAPTION, entry_id="1-0", window=1, start=4.0, end=19.75,
                     wall_time=time.time(), text=HOSTILE)
        while not self.stop.is_set():
            for entry_id, q in self.intake.poll(block_ms=200):
                if not isinstance(q, Question):
                    continue
                base = dict(question_id=q.id, stream=q.stream, question=q.text)
                if q.kind == "report":
                    report = Report(stream=q.stream, start=q.start, end=q.end, captions=3, summary=HOSTILE)
                    answer = Answer(**base, kind=AnswerKind.REPORT, text=f"# Report\n\n{HOSTILE}\n", report=report)
                elif q.start is None or q.start > time.time() - 3600 * 1.5:  # the page's range arrived
                    answer = Answer(**base, kind=AnswerKind.HISTORY, text=f"At 14:02. {HOSTILE}", sources=[source])
                else:
                    answer = Answer(**base, kind=AnswerKind.HISTORY, error="no range sent")
                self.intake.complete(entry_id, q, answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.intake.close()


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    context.close()


def test_search_box_shows_hits_as_text_on_the_grid_and_a_streams_page(page, web_server, redis_url):
    seed(redis_url)
    page.goto(web_server.url)
    page.fill("#search-q", "red circle")
    page.click("#search button[type=submit]")
    page.wait_for_selector("#hits .hit", timeout=15000)
    texts = page.locator("#hits .hit .text").all_text_contents()
    assert HOSTILE in texts and "a red circle moves left." in texts and "a red circle stays still." in texts
    assert page.locator("#hits img[src='x'], #hits script").count() == 0
    assert page.evaluate("window.__pwned") is None
    # Each stream's event window has its snapshot; the hits show them, loaded.
    assert page.locator("#hits .hit[data-kind='event'] img").count() == 2
    page.wait_for_function("[...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth > 0)")
    assert "of" in page.locator("#search-status").text_content()

    page.fill("#search-q", '"red circle moves left"')
    page.click("#search button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#hits .hit').length === 1", timeout=15000)

    page.fill("#search-q", "the *")  # nothing to search: the server's one line, shown
    page.click("#search button[type=submit]")
    page.wait_for_selector("#search-status.err", timeout=15000)
    assert "no words" in page.locator("#search-status").text_content()

    page.goto(web_server.url + "streams/yard")
    page.fill("#search-q", "red circle")
    page.click("#search button[type=submit]")
    page.wait_for_selector("#hits .hit", timeout=15000)
    assert set(page.locator("#hits .hit .meta a").all_text_contents()) == {"yard"}
    assert page.errors == []


def test_question_about_the_past_and_report_render_as_text(page, web_server, redis_url):
    seed(redis_url)
    answerer = HistoryAnswerer(redis_url)
    try:
        page.goto(web_server.url + "streams/gate")
        page.fill("#past-question", "When was a red circle on screen?")
        page.click("#past-button")
        page.wait_for_selector("#past-reply .answer", timeout=30000)
        assert page.locator("#past-reply .answer").text_content() == f"At 14:02. {HOSTILE}"
        assert page.locator("#past-reply .hit .text").text_content() == HOSTILE

        page.click("#report-button")
        page.wait_for_selector("#report-out pre.markdown", timeout=30000)
        assert HOSTILE in page.locator("#report-out pre.markdown").text_content()
        assert page.locator("main img[src='x'], main script").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.errors == []
    finally:
        answerer.close()
