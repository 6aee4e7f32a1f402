"""The pages in headless Chromium (Debian's, driven by Playwright) against a real Redis and web
server: live updates, the reconnecting badge, the ask box, escaping, the token, screenshots."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from connectors.publisher import Publisher
from connectors.redis_schema import Answer, AnswerKind, IngestState, StreamInfo, StreamStatus
from pipeline.pictures import window_picture
from pipeline.web.app import RESYNC_S, SECURITY_HEADERS
from pipeline.web.server import WebServer
from tests.support.records import make_caption, make_event
from tests.support.web import STANDING_QUESTION, standing_answer

OUT = Path(__file__).resolve().parents[1] / "out" / "web"
SHOWN_WITHIN_MS = 5000  # a caption must be on / within 5 s of its publication
# A wait for an update to show: well past the server's full re-read, which catches what a push
# missed, so a busy machine cannot fail it; a page that never updates still does.
UPDATE_WAIT_MS = int(6 * RESYNC_S * 1000)

# Records when each caption text first appears on the page (Date.now(), same clock as Python).
WATCH_CAPTIONS = """
window.__shown = {};
new MutationObserver(() => {
  for (const node of document.querySelectorAll('.caption')) {
    const text = node.textContent;
    if (!(text in window.__shown)) window.__shown[text] = Date.now();
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def scene(seed: int) -> np.ndarray:
    """A calm picture (gradient and a block) rather than noise, so screenshots look like frames."""
    y, x = np.mgrid[0:576, 0:576]
    image = np.stack([(x * 0.3 + seed * 20) % 256, (y * 0.35 + 40) % 256, np.full_like(x, 90 + seed * 10)], -1)
    image[200 + seed * 10:330, 150 + seed * 30:300 + seed * 30] = (220, 200, 60)
    return image.astype(np.uint8)


class Camera:
    """Publishes a stream through the contract as the pipeline does."""

    def __init__(self, redis_url: str, sid: str, source: str = "rtsp://viewer:secret@10.0.0.7/stream1") -> None:
        self.pub = Publisher(redis_url)
        self.sid = sid
        self.info = self.pub.register_stream(StreamInfo(id=sid, source=source))
        self.window = 0

    def caption(self, text: str, events: int = 0) -> float:
        now = time.time()
        caption = make_caption(self.window, stream=self.sid, run=self.info.run, text=text, latency_s=0.8,
                               wall_start=now - 15.75, wall_end=now)
        evs = [make_event(self.window, stream=self.sid, run=self.info.run, question="Is a vehicle at the gate?",
                          text="Yes, a white van.") for _ in range(events)]
        standing = [Answer(question_id="vehicle", stream=self.sid, question="Is a vehicle at the gate?",
                           kind=AnswerKind.STANDING, window=self.window, start=caption.start, end=caption.end,
                           text="Yes, a white van." if events else "No.", probability=0.93 if events else 0.04)]
        published_at = time.time()
        self.pub.publish_window(caption, standing, evs, frame=window_picture(scene(self.window % 5), caption))
        self.window += 1
        return published_at

    def status(self, state: IngestState, error: str | None = None) -> None:
        self.pub.publish_status(StreamStatus(stream=self.sid, state=state, last_error=error,
                                             frames_in=40 * self.window, windows_done=self.window))

    def close(self) -> None:
        self.pub.close()


def new_page(browser, bypass_csp: bool = False, width: int = 1280, height: int = 800):
    """A page in a context of its own, under the server's CSP unless `bypass_csp`; script errors
    and the CSP's refusals (Chromium reports them on the console) land in `page.errors`. Under
    the CSP, wait_for_function needs a function ("() => ..."): a bare expression is eval'd."""
    context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=bypass_csp)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.errors = errors
    return page


@pytest.fixture
def page(browser, web_server):
    page = new_page(browser)
    yield page
    page.context.close()


def open_grid(page, web_server) -> None:
    page.add_init_script(WATCH_CAPTIONS)
    page.goto(web_server.url)
    page.wait_for_selector("#conn:text('live updates')", timeout=15000)


def test_captions_show_within_5_s_and_state_changes_follow(page, web_server, redis_url):
    cam = Camera(redis_url, "gate")
    cam.status(IngestState.LIVE)
    cam.caption("first caption")
    open_grid(page, web_server)
    page.wait_for_selector(".card[data-stream='gate'] .caption:text('first caption')", timeout=15000)

    delays = []
    for i in range(5):
        text = f"a white van stops at the gate ({i})"
        published_at = cam.caption(text)
        page.wait_for_function(f"() => window.__shown[{text!r}] !== undefined", timeout=15000)
        delays.append(page.evaluate(f"window.__shown[{text!r}]") / 1000 - published_at)
    print(f"\nRedis -> screen: median {statistics.median(delays) * 1000:.0f} ms, "
          f"max {max(delays) * 1000:.0f} ms over {len(delays)} captions")
    assert max(delays) * 1000 < SHOWN_WITHIN_MS, delays

    # The camera drops: the badge turns to reconnecting with the reason, then back to live.
    published_at = time.time()
    cam.status(IngestState.RECONNECTING, "connection lost: rtsp://viewer:***@10.0.0.7/stream1 (timeout)")
    card = page.locator(".card[data-stream='gate']")
    card.locator(".badge:text-is('reconnecting')").wait_for(timeout=UPDATE_WAIT_MS)
    print(f"state change -> screen: {(time.time() - published_at) * 1000:.0f} ms (as seen by the test, an upper bound)")
    assert "connection lost" in card.locator(".error").text_content()
    cam.status(IngestState.LIVE)
    card.locator(".badge:text-is('live')").wait_for(timeout=UPDATE_WAIT_MS)

    # An event highlights the card within 2 s of its publication.
    assert "alert" not in card.get_attribute("class")
    published_at = cam.caption("a person walks to the gate", events=1)
    page.wait_for_selector(".card.alert[data-stream='gate']", timeout=UPDATE_WAIT_MS)
    print(f"event -> screen: {(time.time() - published_at) * 1000:.0f} ms (upper bound)")
    assert "Is a vehicle at the gate? → Yes, a white van." in card.locator(".events").text_content()
    assert page.errors == []
    cam.close()


def test_model_output_is_shown_as_text_and_never_runs(browser, web_server, redis_url):
    """Without the CSP (bypassed here): the escaping holds by itself; the CSP is a second line."""
    page = new_page(browser, bypass_csp=True)
    cam = Camera(redis_url, "lobby")
    cam.status(IngestState.LIVE)
    hostile = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">']
    for text in hostile:
        cam.caption(text, events=0)
    open_grid(page, web_server)
    page.wait_for_selector(".card[data-stream='lobby']", timeout=15000)
    assert page.locator(".card[data-stream='lobby'] .caption").text_content() == hostile[1]
    assert page.locator(".card[data-stream='lobby'] .caption img").count() == 0

    page.goto(web_server.url + "streams/lobby")
    page.wait_for_selector(".timeline li", timeout=15000)
    timeline = page.locator(".timeline").text_content()
    assert hostile[0] in timeline and hostile[1] in timeline
    assert page.locator("main script, main img[src='x']").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []
    page.context.close()
    cam.close()


def test_pages_are_served_under_a_strict_csp_that_refuses_inline_script(page, web_server, redis_url):
    Camera(redis_url, "lobby").status(IngestState.LIVE)
    for path in ("", "streams/lobby", "login"):
        response = page.goto(web_server.url + path)
        assert response.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"], path
    page.goto(web_server.url)
    page.wait_for_selector(".card[data-stream='lobby']", timeout=15000)
    # Markup that slipped into the page: the browser refuses its inline handler.
    violated = page.evaluate("""() => new Promise(resolve => {
        document.addEventListener("securitypolicyviolation", e => resolve(e.violatedDirective));
        setTimeout(() => resolve("no violation within 30 s"), 30000);
        document.body.insertAdjacentHTML("beforeend", '<img src="/missing.png" onerror="window.__pwned = 1">');
    })""")
    assert violated.startswith("script-src")
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".card[data-stream='lobby'] .badge").text_content() == "live"  # the page's own scripts run


def test_asking_a_question_shows_the_answer_or_the_error(page, web_server, redis_url, answering_pipeline):
    """The running pipeline answers on its latest window; a registered stream that is not
    running gets the pipeline's error reply."""
    page.goto(web_server.url + f"streams/{answering_pipeline}")
    page.wait_for_selector(".timeline li", timeout=15000)
    page.fill("#question", STANDING_QUESTION["prompt"])
    page.select_option("#kind", "yesno")
    page.click("#ask-button")
    page.wait_for_selector("#reply .answer", timeout=120_000)
    window = int(page.locator("#reply .meta").text_content().split()[1])
    standing = standing_answer(redis_url, window)  # the same question on the same window
    assert page.locator("#reply .meta").text_content() == f"window {window} · {standing.start:.1f}–{standing.end:.1f} s"
    assert page.locator("#reply .answer").text_content() == f"{standing.text}  P(yes) = {standing.probability:.2f}"

    cam = Camera(redis_url, "dock")  # registered, never run
    cam.status(IngestState.STOPPED)
    cam.caption("a forklift moves pallets")
    page.goto(web_server.url + "streams/dock")
    page.wait_for_selector(".timeline li", timeout=15000)
    page.fill("#question", "Is the <b>door</b> open?")
    page.click("#ask-button")
    page.wait_for_selector("#reply.err", timeout=120_000)
    assert page.locator("#reply").text_content() == "stream 'dock' is not running"
    assert page.errors == []
    cam.close()


def test_off_loopback_the_page_needs_the_token(browser, redis_url):
    Camera(redis_url, "yard").status(IngestState.LIVE)
    server = WebServer(redis_url, "0.0.0.0", 0, token="s3cret").start()
    page = new_page(browser)
    context = page.context
    try:
        page.goto(f"http://127.0.0.1:{server.port}/streams/yard")
        assert "/login" in page.url and page.locator(".card").count() == 0
        assert page.evaluate("fetch('/api/streams').then(r => r.status)") == 401
        page.fill("#token", "wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("#failed:visible")
        page.fill("#token", "s3cret")
        page.click("button[type=submit]")
        page.wait_for_url(f"http://127.0.0.1:{server.port}/streams/yard")
        page.wait_for_selector("#badge .badge:text-is('live')", timeout=15000)
        assert page.errors == []
    finally:
        context.close()
        server.stop()


def test_screenshots_for_a_person_to_look_at(browser, web_server, redis_url):
    """Screenshots to look at, and what a person would look for in them: each stream's state and
    its source without credentials, the alert only where there is an event, no sideways
    scrolling on a phone."""
    sources = {"loading-bay": "rtsp://viewer:secret@10.0.0.21/stream1", "lobby": "rtsp://10.0.0.22/main",
               "archive": "/data/videos/2026-11-20.mp4"}
    shown_sources = {"loading-bay": "rtsp://viewer:***@10.0.0.21/stream1", "lobby": "rtsp://10.0.0.22/main",
                     "archive": "/data/videos/2026-11-20.mp4"}
    states = {"loading-bay": IngestState.LIVE, "lobby": IngestState.RECONNECTING, "archive": IngestState.ENDED}
    cams = {sid: Camera(redis_url, sid, source) for sid, source in sources.items()}
    texts = {"loading-bay": ["A forklift carries a pallet past two workers.", "A white van backs up to door 3."],
             "lobby": ["An empty lobby; the revolving door turns slowly.", "Two visitors sign in at the desk."],
             "archive": ["A delivery truck leaves the yard.", "The yard is empty."]}
    for sid, cam in cams.items():
        for text in texts[sid]:
            cam.caption(text, events=1 if sid == "loading-bay" and "van" in text else 0)
    cams["loading-bay"].status(states["loading-bay"])
    cams["lobby"].status(states["lobby"], "connection lost: rtsp://10.0.0.22/main (read timeout)")
    cams["archive"].status(states["archive"])
    OUT.mkdir(parents=True, exist_ok=True)
    shots = {"grid-1280.png": ("", 1280, 800), "grid-phone.png": ("", 390, 844),
             "stream-1280.png": ("streams/loading-bay", 1280, 1000), "stream-phone.png": ("streams/loading-bay", 390, 844)}
    for name, (path, width, height) in shots.items():
        page = new_page(browser, width=width, height=height)
        page.goto(web_server.url + path)
        page.wait_for_selector(".picture img:visible", timeout=15000)
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=str(OUT / name), full_page=True)
        if not path:
            for sid, state in states.items():
                card = page.locator(f".card[data-stream='{sid}']")
                assert card.locator(".badge").text_content() == state.value, sid
                assert ("alert" in card.get_attribute("class").split()) == (sid == "loading-bay"), sid
                assert card.locator(".caption").text_content() == texts[sid][-1], sid
            assert "connection lost" in page.locator(".card[data-stream='lobby'] .error").text_content()
        else:
            assert page.locator("#source").text_content() == shown_sources["loading-bay"]
        assert "secret" not in page.content()
        if width < 500:  # the phone: nothing wider than the screen
            assert page.evaluate("document.documentElement.scrollWidth") <= width, name
        assert page.errors == [], name
        page.context.close()
    for sid in ("lobby", "archive"):  # each stream's own page names its source, credentials masked
        page = new_page(browser)
        page.goto(web_server.url + f"streams/{sid}")
        page.wait_for_selector(f"#source:text-is('{shown_sources[sid]}')", timeout=15000)
        page.context.close()
    assert all((OUT / name).stat().st_size > 10_000 for name in shots)
    for cam in cams.values():
        cam.close()


def test_stream_page_timeline_pages_back_and_follows_live_without_duplicates(page, web_server, redis_url):
    cam = Camera(redis_url, "yard")
    cam.status(IngestState.LIVE)
    for i in range(35):
        cam.caption(f"caption {i}")
    page.goto(web_server.url + "streams/yard")
    page.wait_for_selector(".timeline li", timeout=15000)
    assert page.locator(".timeline li").count() == 30  # one page, newest first
    page.click("#older")
    page.wait_for_function("() => document.querySelectorAll('.timeline li').length === 35", timeout=15000)
    assert page.locator("#older").is_hidden()

    for i in range(35, 45):  # a burst: many updates while fetches are in flight
        cam.caption(f"caption {i}")
    page.wait_for_selector(".timeline li:first-child:has-text('caption 44')", timeout=15000)
    page.wait_for_timeout(1500)  # let any late duplicate show up
    windows = [int(t.split(" ")[0].lstrip("#")) for t in page.locator(".timeline .range").all_text_contents()]
    assert windows == list(range(44, -1, -1))
    assert page.errors == []
    cam.close()


def test_a_failed_window_and_a_silent_pipeline_are_said_plainly(page, web_server, redis_url):
    cam = Camera(redis_url, "dock")
    failed = make_caption(0, stream="dock", run=cam.info.run, text="", error="RuntimeError: CUDA out of memory")
    cam.pub.publish_window(failed)
    # The last status came a minute ago: the pipeline stopped refreshing it.
    cam.pub.publish_status(StreamStatus(stream="dock", state=IngestState.LIVE, updated_at=time.time() - 60))
    open_grid(page, web_server)
    card = page.locator(".card[data-stream='dock']")
    card.locator(".caption:text('model failed on this window: RuntimeError: CUDA out of memory')").wait_for(timeout=15000)
    card.locator(".error:text('is the pipeline running?')").wait_for(timeout=UPDATE_WAIT_MS)
    cam.status(IngestState.LIVE)  # fresh again: the warning goes
    card.locator(".error").wait_for(state="hidden", timeout=UPDATE_WAIT_MS)
    assert page.errors == []
    cam.close()
