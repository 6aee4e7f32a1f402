"""Pipeline throughput and overhead with the tiny random-weight model (or --model) on this machine.

1. Baseline: the model called directly on the same windows of a file (encode new frames,
   generate), no Ray, no Redis. 2. The same file through the pipeline (Ray + Redis):
   per-window overhead = pipeline time per window - direct time per window; end-to-end
   latency p50/p95 from the published captions. 3. Live streams at --fps: how many looping
   cameras one worker sustains without skipping a window.

    python -m bench.pipeline_bench [--model PATH] [--streams 1,2,4,8] [--seconds 20]

The clip: --clip-seconds of moving texture + noise, 640x360 at 24 fps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import torch

from bench.common import checkpoint, device_name, parse_args, percentile, write_test_clip
from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.sources import open_source
from model import SlowFastVLM, VideoQuery
from pipeline.config import DEFAULT_CAPTION_PROMPT, load_config
from pipeline.messages import StreamStats
from pipeline.runner import run_pipeline


def direct_seconds_per_window(vlm: SlowFastVLM, clip: Path, window: int, stride: int, fps: float,
                              max_new_tokens: int) -> tuple[float, int]:
    with open_source(str(clip), fps=fps, size=vlm.config.image_size) as source:
        frames = [f.image for f in source]
    starts = list(range(0, len(frames) - window + 1, stride))
    features: dict[int, torch.Tensor] = {}
    begin = time.perf_counter()
    for start in starts:
        new = [i for i in range(start, start + window) if i not in features]
        encoded = vlm.encode_frames(vlm.preprocess(np.stack([frames[i] for i in new])))
        features.update(zip(new, encoded))
        stacked = torch.stack([features[i] for i in range(start, start + window)])
        vlm.generate([VideoQuery(features=stacked, question=DEFAULT_CAPTION_PROMPT)], max_new_tokens=max_new_tokens)
    return (time.perf_counter() - begin) / len(starts), len(starts)


def live_trial(count: int, clip: Path, common: dict, args: argparse.Namespace) -> bool:
    """`count` looping cameras for `args.seconds` after the first caption: kept up when no
    window was skipped and every camera got (nearly) every window that closed meanwhile."""
    ids = [f"x{count}-cam{i}" for i in range(count)]
    stop, first = threading.Event(), threading.Event()

    def on_caption(caption) -> None:
        if not first.is_set():
            first.set()
            threading.Timer(args.seconds, stop.set).start()

    # Ingest placement is not what is measured here: every camera gets placed.
    config = load_config(None, streams=[{"id": i, "source": f"loop://{clip}", "live": True} for i in ids],
                         ingest_cpus=0.01, **common)
    result = run_pipeline(config, stop=stop, on_event=lambda line: None, on_caption=on_caption)
    client = SlowFastClient(common["redis_url"])
    latencies = [c.latency_s for i in ids for c in client.history(i, count=10_000) if c.latency_s is not None]
    stats = [result[i].stats or StreamStats() for i in ids]  # no stats: the worker could not be asked
    done = [s.windows_done for s in stats]
    skipped = sum(s.windows_skipped for s in stats)
    expected = int(args.seconds * args.fps / args.stride)
    print(f"  live x{count}: windows done per camera {min(done)}..{max(done)} (about {expected} closed in "
          f"{args.seconds:.0f} s), {skipped} skipped, latency p95 "
          f"{percentile(latencies, 0.95) if latencies else float('nan'):.2f} s")
    return skipped == 0 and min(done) >= expected - 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: tiny random model)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--clip-seconds", type=float, default=60.0)
    parser.add_argument("--streams", default="1,2,4,8", help="live stream counts to try")
    parser.add_argument("--seconds", type=float, default=20.0, help="live trial length after the first window fills")
    args = parse_args(parser, argv, smoke={"window": 8, "stride": 4, "max_new_tokens": 2, "clip_seconds": 4.0,
                                           "streams": "1", "seconds": 2.0})
    with tempfile.TemporaryDirectory() as tmp:
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, tmp: Path) -> None:
    clip = write_test_clip(tmp / "clip.mp4", args.clip_seconds, size=(640, 360), rate=24)
    model = checkpoint(args.model, tmp)
    vlm = SlowFastVLM.from_pretrained(model)
    direct, windows = direct_seconds_per_window(vlm, clip, args.window, args.stride, args.fps, args.max_new_tokens)
    del vlm

    ray.init(include_dashboard=False, log_to_driver=False)
    with EmbeddedRedis() as redis:
        common = dict(redis_url=redis.url, model=model, window=args.window, stride=args.stride, fps=args.fps,
                      out_dir=tmp / "out", generation={"max_new_tokens": args.max_new_tokens})
        config = load_config(None, streams=[{"id": "file", "source": str(clip)}], **common)
        arrivals: list[float] = []
        begin = time.perf_counter()
        summary = run_pipeline(config, on_event=lambda line: None,
                               on_caption=lambda caption: arrivals.append(time.perf_counter()))["file"]
        pipeline_total = time.perf_counter() - begin
        captions = SlowFastClient(redis.url).history("file", count=10_000)
        latencies = [c.latency_s for c in captions if c.latency_s is not None]
        # Steady state: the spacing of captions once the first has arrived (start-up excluded).
        per_window = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)

        sustained = 0
        for count in (int(n) for n in args.streams.split(",")):
            if live_trial(count, clip, common, args):
                sustained = count
            else:
                break
    ray.shutdown()

    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"device: {device}; window {args.window}, stride {args.stride}, {args.fps} fps, "
          f"{args.max_new_tokens} new tokens, {windows} windows")
    print(f"direct model per window:        {direct * 1e3:8.1f} ms  (baseline)")
    print(f"pipeline per window (file run): {per_window * 1e3:8.1f} ms  (steady state; whole run "
          f"{pipeline_total:.1f} s for {summary.windows} windows incl. start-up)")
    print(f"pipeline overhead per window:   {(per_window - direct) * 1e3:8.1f} ms  (decode, Ray, Redis; "
          "on the same cores as the model)")
    print(f"pipeline / direct:              {per_window / direct:8.2f}x")
    print(f"latency p50 / p95:              {statistics.median(latencies):.3f} / {percentile(latencies, 0.95):.3f} s")
    print(f"live streams sustained without skipping: {sustained}")


if __name__ == "__main__":
    main()
