"""Memory an ingest actor keeps for the frames it stores: one object per frame against the
pipeline's groups of gcd(window, stride) frames.

A local Ray runs the ingest actor's storing and the model worker's fetching with the
pipeline's own code (`FrameGroups`, `SlidingWindow`, `frames_from_objects`): an async actor
stores frames from a thread and sends each window's references to a sink actor, which gets
the frames and keeps the last few windows, as a worker's queue does. After a warm-up, the
owner's live heap (jemalloc's `stats.allocated`) and anonymous RSS are sampled; the kept
bytes per frame are the least-squares slope. Measured, both settings in the same run; the
MB an hour of a 4-fps camera is derived from them.

    python -m bench.frame_store_bench [--frames 60000] [--window 16] [--stride 8] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
import ray

from pipeline.ray_session import JEMALLOC_ON_WORKERS, LOCAL_RAY_SYSTEM_CONFIG
from pipeline.window import FrameGroups, SlidingWindow, frames_from_objects, frames_per_object

from .common import parse_args, slope_per_hour

SAMPLES = 10
CAMERA_FPS = 4.0


def owner_memory_mb() -> tuple[float, float]:
    """(jemalloc's allocated bytes, or -1 without jemalloc; anonymous RSS), in MB."""
    allocated = -1.0
    try:
        mallctl = ctypes.CDLL(None).mallctl
        epoch, size = ctypes.c_uint64(1), ctypes.c_size_t(8)
        mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), size)
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(8)
        if mallctl(b"stats.allocated", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0:
            allocated = value.value / 2**20
    except AttributeError:  # no jemalloc in this process
        pass
    with open("/proc/self/status") as status:
        anon = next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024
    return allocated, anon


@ray.remote(num_cpus=0)
class Sink:
    """Gets each window's frames, as the model worker does, and keeps the last windows."""

    def __init__(self):
        self.kept: deque = deque(maxlen=4)

    def submit(self, window) -> int:
        self.kept.append(window)
        return len(frames_from_objects(window.frames[-1:], ray.get))


@ray.remote(num_cpus=0)
class Owner:
    """Stores frames from a thread, as the ingest actor does; returns its memory samples."""

    def __init__(self, sink, frames: int, warmup: int, window: int, stride: int, per_object: int, side: int):
        self.sink, self.frames, self.warmup = sink, frames, warmup
        self.window, self.stride, self.per_object, self.side = window, stride, per_object, side
        self.samples: list[tuple[int, float, float]] = []

    async def run(self) -> list[tuple[int, float, float]]:
        thread = threading.Thread(target=self._store)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.2)
        return self.samples

    def _store(self) -> None:
        image = np.zeros((self.side, self.side, 3), np.uint8)
        groups = FrameGroups(self.per_object, lambda images: ray.put(np.stack(images)))
        windows, in_flight = SlidingWindow("bench", self.window, self.stride, live=True), deque()
        every = max(1, (self.frames - self.warmup) // SAMPLES)
        for n in range(self.frames):
            for ref in groups.add(n, n / CAMERA_FPS, 0.0, image):
                window = windows.push(ref)
                if window is not None:
                    in_flight.append(self.sink.submit.remote(window))
                    while len(in_flight) > 8:
                        ray.get(in_flight.popleft())
            if n >= self.warmup and (n - self.warmup) % every == 0:
                self.samples.append((n, *owner_memory_mb()))
        ray.get(list(in_flight))


def kept_bytes_per_frame(samples: list[tuple[int, float, float]], column: int) -> float:
    """Least-squares slope of a memory column against frames stored, in bytes per frame."""
    frames = [s[0] for s in samples]
    return slope_per_hour(frames, [s[column] * 2**20 for s in samples]) / 3600


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60_000, help="frames stored per setting")
    parser.add_argument("--warmup", type=int, default=10_000, help="frames stored before sampling")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels")
    args = parse_args(parser, argv, smoke=dict(frames=1200, warmup=200, size=32))
    if args.warmup + SAMPLES > args.frames:
        print(f"--frames {args.frames} leaves fewer than {SAMPLES} frames after --warmup {args.warmup}")
        return 1
    os.environ.update({**JEMALLOC_ON_WORKERS, "RAY_USAGE_STATS_ENABLED": "0"})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    settings = {"one object per frame (the baseline)": 1,
                f"groups of {frames_per_object(args.window, args.stride)} (the pipeline's)":
                    frames_per_object(args.window, args.stride)}
    kept = {}
    for name, per_object in settings.items():
        sink = Sink.remote()
        samples = ray.get(Owner.remote(sink, args.frames, args.warmup, args.window, args.stride, per_object,
                                       args.size).run.remote())
        kept[name] = (kept_bytes_per_frame(samples, 1), kept_bytes_per_frame(samples, 2), samples[0][1] >= 0)
    ray.shutdown()
    baseline = next(iter(kept.values()))
    print(f"memory the storing actor keeps per frame, window {args.window}, stride {args.stride}, "
          f"{args.size}x{args.size} frames, {args.frames - args.warmup} frames sampled after {args.warmup} "
          f"(bytes per frame measured; MB/h of a {CAMERA_FPS:g}-fps camera derived; ratio against the baseline):")
    for name, (heap, anon, has_jemalloc) in kept.items():
        heap_text = per_frame(heap, f", {ratio(heap, baseline[0])}") if has_jemalloc else "no jemalloc in the actor"
        print(f"  {name:<40} live heap {heap_text}; anonymous RSS {per_frame(anon)}")
    return 0


def per_frame(kept_bytes: float, more: str = "") -> str:
    """Bytes kept per frame and, derived, MB an hour of a CAMERA_FPS camera (then `more`)."""
    return f"{kept_bytes:+8.0f} B/frame ({kept_bytes * CAMERA_FPS * 3600 / 1e6:+5.2f} MB/h{more})"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline if abs(baseline) > 1 else float('nan'):5.2f}x"


if __name__ == "__main__":
    sys.exit(main())
