"""`slowfast demo`: the synthetic-world clip as a file and as a looping camera, a standing
question that should fire on its red-circle scenes, and when to stop."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import redis

from connectors.client import SlowFastClient
from connectors.redis_schema import IngestState, NotificationKind

from .config import PipelineConfig, StandingQuestion, StreamConfig, load_config

# close_after 1: each visit of the red circle is an event of its own
DEMO_QUESTION = StandingQuestion(id="red-circle", prompt="Is there a red circle?",
                                 trigger={"p_yes_above": 0.5, "close_after": 1})
DEMO_MAX_NEW_TOKENS = 16
FILE_STREAM, CAMERA_STREAM = "file", "camera"


def demo_config(clip: Path, model: str | None, out: Path, window: int, stride: int, redis_url: str) -> PipelineConfig:
    return load_config(
        None, model=model, out_dir=out, window=window, stride=stride, redis_url=redis_url,
        streams=[StreamConfig(id=FILE_STREAM, source=str(clip), live=False, standing_questions=[DEMO_QUESTION]),
                 StreamConfig(id=CAMERA_STREAM, source=f"loop://{clip}", live=True)],
        generation={"max_new_tokens": DEMO_MAX_NEW_TOKENS},
    )


def stop_demo(client: SlowFastClient, camera: str, seconds: float, file: str, stop: threading.Event) -> None:
    """Set `stop` once the camera has run `seconds` from its first frame (start-up not counted)
    and the file is done."""
    notes = client.notifications(camera, stop=stop)  # subscribed now, before the camera starts

    def file_done() -> bool:
        status = client.status(file)
        return status is not None and status.state in (IngestState.ENDED, IngestState.FAILED)

    def wait() -> None:
        with contextlib.suppress(redis.exceptions.ConnectionError):  # Redis gone: the demo is over
            wait_for_camera_and_file()

    def wait_for_camera_and_file() -> None:
        for note in notes:
            status = client.status(camera) if note.kind == NotificationKind.STATUS else None
            if status is not None and status.frames_in > 0:
                break
        if stop.wait(seconds):
            return
        while not file_done():
            if stop.wait(0.5):
                return
        stop.set()

    threading.Thread(target=wait, daemon=True).start()
