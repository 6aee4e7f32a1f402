"""What the processor makes of frames that are gone from the frame store (no Ray; real Redis,
tiny model): a window that cannot be encoded is reported, not published; one whose picture
alone is gone is published without it."""

from __future__ import annotations

import pytest

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from pipeline.config import GenerationConfig, StreamConfig
from pipeline.processor import WindowProcessor
from pipeline.window import FrameRef, FramesLost, Window
from tests.support.random_model import random_frames

WINDOW, STRIDE = 4, 2


class FrameStore:
    """Frames by seq; `gone` ones raise FramesLost, as the worker's object-store fetch does."""

    def __init__(self, images):
        self.images, self.gone = images, set()

    def fetch(self, refs):
        if any(f.seq in self.gone for f in refs):
            raise FramesLost("frames gone with their owner")
        return [self.images[f.seq] for f in refs]


def test_a_window_whose_frames_are_gone_is_reported_and_one_missing_only_its_picture_is_published(
    tiny_vlm, redis_url
):
    images = random_frames(WINDOW + STRIDE, size=64, seed=3)
    refs = [FrameRef(i, i / 4.0, 1.7e9 + i / 4.0, None) for i in range(len(images))]
    first, second = (Window("file", k, tuple(refs[k * STRIDE : k * STRIDE + WINDOW]), live=False) for k in (0, 1))
    store = FrameStore(images)
    processor = WindowProcessor(tiny_vlm, Publisher(redis_url), GenerationConfig(max_new_tokens=3), 2,
                                fetch_frames=store.fetch, model_name="tiny")
    processor.add_stream(StreamConfig(id="file", source="clip.mp4", live=False), run=1, files=None)
    client = SlowFastClient(redis_url)

    store.gone = {WINDOW + STRIDE - 1}  # the second window's newest frame: it cannot be encoded
    processor.process([first])
    with pytest.raises(FramesLost) as lost:
        processor.process([second])
    assert lost.value.window is second
    state = processor.streams["file"]
    assert [c.window for c in client.history("file")] == [0] and state.last_frame_seq == WINDOW - 1
    assert state.frames_encoded == WINDOW

    store.gone = set()  # re-sent with its frames, encoded; then its last frame goes
    original_encode = tiny_vlm.encode_frames

    class GoneAfterEncoding:
        def __getattr__(self, name):
            return getattr(tiny_vlm, name)

        def encode_frames(self, pixels):
            store.gone = {WINDOW + STRIDE - 1}
            return original_encode(pixels)

    processor.vlm = GoneAfterEncoding()
    (caption,) = processor.process([second])
    assert caption.window == 1 and caption.error is None
    assert [c.window for c in client.history("file")] == [0, 1]
    assert client.frame_info("file").window == 0  # the picture stays the previous window's
