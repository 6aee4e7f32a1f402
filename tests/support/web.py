"""The web app on a real socket (uvicorn in a thread) against the test's Redis, headless Debian
Chromium driven by Playwright (no browser download: the system executable), and the real
pipeline answering the questions asked through them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.client import SlowFastClient
from connectors.redis_schema import Answer
from pipeline.config import load_config
from pipeline.web.server import WebServer
from tests.support.background_run import BackgroundRun, wait_until
from tests.support.media import cfr_times, make_clip
from tests.support.system_parts import missing_part

__all__ = ["web_server", "browser", "answering_pipeline", "CHROMIUM"]

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


ANSWERING_STREAM = "cam"
# The yes/no question the web tests ask, also standing on the stream: its standing answer for a
# window is the pipeline's own record that an ad-hoc reply on that window must equal. A P(yes)
# threshold nothing passes: no events, but the answers carry P(yes).
STANDING_QUESTION = {"id": "door", "prompt": "Is the door open?", "every_n_windows": 1,
                     "trigger": {"p_yes_above": 1.0}}


@pytest.fixture
def answering_pipeline(ray_session, redis_url: str, tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """The real pipeline (random checkpoint) answering questions about a live looping camera;
    yields its stream id once it has a window to answer on."""
    clip = make_clip(tmp_path / "cam.mp4", cfr_times(8, 6.0)).path
    stream = {"id": ANSWERING_STREAM, "source": f"loop://{clip}", "live": True, "standing_questions": [STANDING_QUESTION]}
    config = load_config(None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path / "out", window=8,
                         stride=4, fps=4.0, streams=[stream], generation={"max_new_tokens": 6})
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: client.latest(ANSWERING_STREAM) is not None, timeout=300)
        yield ANSWERING_STREAM
    finally:
        run.finish()
        client.close()


def standing_answer(redis_url: str, window: int) -> Answer:
    """The pipeline's answer to STANDING_QUESTION on `window` of the answering stream."""
    with SlowFastClient(redis_url) as client:
        return next(a for a in client.answers(ANSWERING_STREAM, count=10_000)
                    if a.window == window and a.question_id == STANDING_QUESTION["id"])
