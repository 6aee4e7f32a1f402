"""`make demo` until the Ray pipeline lands: one generated clip, sliding windows, tiny model, captions in Redis.

Runs in one process on what exists today: a PyAV source sampling 4 fps at 576 px, each
frame encoded once into a feature ring, a caption per 64-frame window every 16 frames,
published through the Redis contract on an embedded server and read back with the client.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import deque
from pathlib import Path

import av
import numpy as np
import torch

from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.publisher import Publisher
from connectors.redis_schema import Caption, StreamInfo
from connectors.sources import Frame, open_source
from model import SlowFastVLM, VideoQuery
from model.tiny import write_tiny_model

CAPTION_PROMPT = "Please describe this video in detail."


def write_clip(path: Path, seconds: float = 24.0, fps: int = 24, size: tuple[int, int] = (640, 360)) -> Path:
    """A synthetic H.264 clip: a moving bright square over a slowly shifting gradient."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(seconds * fps)):
            image = np.stack([(x + 3 * index) % 256, (y + index) % 256, np.full_like(x, 96)], -1).astype(np.uint8)
            left = (index * 7) % (width - 80)
            image[140:220, left : left + 80] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def run(model_path: str | None, window: int, stride: int, max_new_tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        clip = write_clip(workdir / "demo.mp4")
        model_dir = model_path or write_tiny_model(workdir / "tiny-model")
        vlm = SlowFastVLM.from_pretrained(model_dir)
        print(f"model {model_dir} on {vlm.device} ({vlm.dtype}); clip {clip}")
        with EmbeddedRedis() as redis, Publisher(redis.url) as publisher:
            print(f"embedded Redis at {redis.url}")
            info = publisher.register_stream(StreamInfo(id="demo", source=str(clip), live=False))
            frames: deque[Frame] = deque(maxlen=window)
            features: dict[int, torch.Tensor] = {}  # feature ring keyed by frame seq
            pending: list[Frame] = []
            window_index = 0
            with open_source(str(clip), fps=4.0, size=vlm.config.image_size) as source:
                for frame in source:
                    frames.append(frame)
                    pending.append(frame)
                    if len(frames) < window or (len(pending) < stride and window_index > 0):
                        continue
                    new = vlm.encode_frames(vlm.preprocess(np.stack([f.image for f in pending])))
                    features.update(zip((f.seq for f in pending), new))
                    pending.clear()
                    for seq in [s for s in features if s < frames[0].seq]:
                        del features[seq]  # slid out of the window
                    started = time.time()
                    stacked = torch.stack([features[f.seq] for f in frames])
                    (out,) = vlm.generate([VideoQuery(features=stacked, question=CAPTION_PROMPT)],
                                          max_new_tokens=max_new_tokens)
                    caption = Caption(
                        stream="demo", window=window_index, run=info.run,
                        start=frames[0].pts, end=frames[-1].pts,
                        wall_start=frames[0].wall_time, wall_end=frames[-1].wall_time,
                        text=out.text, model=str(model_dir), prompt=CAPTION_PROMPT,
                        latency_s=time.time() - started,
                    )
                    publisher.publish_window(caption)
                    print(f"window {window_index:3d} [{caption.start:6.2f}s - {caption.end:6.2f}s] {out.text!r}")
                    window_index += 1
            history = SlowFastClient(redis.url).history("demo", count=1000)
            print(f"summary: {window_index} windows captioned, {len(history)} captions read back from Redis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a freshly written tiny model)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    run(args.model, args.window, args.stride, args.max_new_tokens)


if __name__ == "__main__":
    main()
