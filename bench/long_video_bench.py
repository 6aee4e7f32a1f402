"""Seconds to caption and summarize one hour of video: measured here, derived for a GPU.

Measured (this machine, tiny random-weight model unless --model): a generated H.264 clip of
--seconds (30 fps, B-frames, 640x360) at the product defaults (64-frame windows, stride 16, 4 fps,
a rolling summary per minute of windows, then the final summary):
  decode   open_source over the clip as the pipeline reads files (skip_nonref), alone;
  model    the model alone on the same frames: each frame encoded once, one caption per
           window (timed from the second window: steady state), the rolling summaries and the
           final summary (text-only), one call each;
  pipeline the whole run through Ray + Redis (`run_pipeline`), from the first caption to the
           end, final summary included (steady state; start-up, Ray and model loading, apart);
  overhead pipeline - decode - model (negative: decoding overlaps the model).
Each is scaled linearly from the clip to one hour (windows and summaries grow linearly).

Derived for a GPU (no GPU here): from the model bench's figures for the 7B model measured
on an H200 (README, Sizing: 5.4 windows/s for the whole per-window step, 16 new frames +
prefill + 64 tokens, at batch 32; tower 183 frames/s); a text-only summary costs a
window's step without the tower. Video decoding from this CPU's measured rate per core,
spread over --gpu-host-cores.

--workers N: the same run again with N model workers, the file split by time over them
(pipeline/segments.py): the wall time with 1 and with N workers (each run from its start,
model loading included), the speed-up against the ideal N, and the packet scan that plans the
segments, measured; then derived for N GPUs: the one-GPU model time above divided by N, plus
the pre-roll frames each segment encodes again, plus the scan.

    .venv/bin/python -m bench.long_video_bench [--seconds 90] [--model PATH] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import torch

from bench.common import checkpoint, parse_args, write_test_clip
from connectors.embedded import EmbeddedRedis
from connectors.redis_schema import Caption
from connectors.sources import open_source, scan_samples
from model import SlowFastVLM, TextQuery, VideoQuery
from pipeline.config import DEFAULT_CAPTION_PROMPT, load_config
from pipeline.messages import StreamStats
from pipeline.runner import run_pipeline
from pipeline.segments import plan_segments
from pipeline.summaries import FinalSummary, RollingSummaries, default_summary_every
from pipeline.window import expected_windows

FPS = 4.0
HOUR = 3600.0


def measure_decode(clip: Path, size: int) -> tuple[float, list[np.ndarray], int]:
    begin = time.perf_counter()
    with open_source(str(clip), fps=FPS, size=size, skip_nonref=True) as source:
        frames = [f.image for f in source]
        decoded = source.stats.decoded
    return time.perf_counter() - begin, frames, decoded


def measure_model(vlm: SlowFastVLM, frames: list[np.ndarray], tokens: int, window: int,
                  stride: int) -> dict[str, float]:
    """Captions of every window (frames encoded once) then rolling + final summaries."""
    starts = list(range(0, len(frames) - window + 1, stride))
    if (len(frames) - window) % stride:
        starts.append(len(frames) - window)  # the tail window, as the pipeline does
    every = default_summary_every(window, stride, FPS)
    rolling = RollingSummaries("bench", run=1, every_n_windows=every)
    features: dict[int, torch.Tensor] = {}
    caption_s = summary_s = 0.0
    summaries = 0
    for seq, start in enumerate(starts):
        if seq == 1:  # steady state from the second window on: the first encodes a whole window
            caption_s = 0.0
        begin = time.perf_counter()
        new = [i for i in range(start, start + window) if i not in features]
        if new:
            features.update(zip(new, vlm.encode_frames(vlm.preprocess(np.stack([frames[i] for i in new])))))
        stacked = torch.stack([features[i] for i in range(start, start + window)])
        (out,) = vlm.generate([VideoQuery(features=stacked, question=DEFAULT_CAPTION_PROMPT)], max_new_tokens=tokens)
        caption_s += time.perf_counter() - begin
        rolling.add_caption(Caption(stream="bench", window=seq, run=1, start=start / FPS, end=(start + window - 1) / FPS,
                                    wall_start=0, wall_end=0, text=out.text))
        task = rolling.next_task(force=seq == len(starts) - 1)
        if task is not None:
            begin = time.perf_counter()
            (text,) = vlm.generate([TextQuery(task.prompt)], max_new_tokens=tokens)
            rolling.complete(text.text)
            summary_s += time.perf_counter() - begin
            summaries += 1
    final = FinalSummary(rolling.done)
    begin = time.perf_counter()
    while final.finished is None:
        texts = [g.text for g in vlm.generate([TextQuery(t.prompt) for t in final.tasks()], max_new_tokens=tokens)]
        final.complete(texts, first_seq=0)
    final_s = time.perf_counter() - begin
    return {"windows": len(starts), "caption_s": caption_s, "summaries": summaries, "summary_s": summary_s,
            "final_s": final_s, "every": every}


def measure_pipeline(clip: Path, model: str, tokens: int, out: Path, window: int, stride: int,
                     **settings) -> dict[str, float]:
    """`settings`: more of the config (workers for a split run)."""
    first = threading.Event()
    marks: dict[str, float] = {}
    events: list[str] = []

    def on_caption(caption) -> None:
        if not first.is_set():
            marks["first"] = time.perf_counter()
            first.set()

    begin = time.perf_counter()
    with EmbeddedRedis() as redis:
        config = load_config(None, redis_url=redis.url, model=model, out_dir=out, window=window, stride=stride,
                             fps=FPS, streams=[{"id": "film", "source": str(clip)}],
                             generation={"max_new_tokens": tokens}, **settings)
        summary = run_pipeline(config, on_event=events.append, on_caption=on_caption)["film"]
    end = time.perf_counter()
    if not (out / "film" / "summary.md").exists():
        sys.exit("the pipeline wrote no summary.md")
    stats = summary.stats or StreamStats()  # no stats: the worker could not be asked
    split = next((e.split("split into ", 1)[1] for e in events if "split into" in e), None)
    return {"startup_s": marks["first"] - begin, "steady_s": end - marks["first"], "windows": stats.windows_done,
            "wall_s": end - begin, "split": split}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_video_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the generated clip")
    parser.add_argument("--model", help="checkpoint folder (default: the tiny random-weight model)")
    parser.add_argument("--window", type=int, default=64, help="frames per window (the product default)")
    parser.add_argument("--stride", type=int, default=16, help="new frames per window (the product default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--gpu-windows-per-s", type=float, default=5.4,
                        help="per-window steps per second on the GPU (H200, batch 32, measured by model_bench)")
    parser.add_argument("--gpu-tower-fps", type=float, default=183.0, help="vision tower frames/s on the GPU (H200)")
    parser.add_argument("--gpu-host-cores", type=int, default=16, help="CPU cores decoding video on the GPU box")
    parser.add_argument("--workers", type=int, default=1, help="also run with N model workers (the file split)")
    parser.add_argument("--split-min-s", type=float, default=20.0, help="shortest segment, s of video (split_min_s)")
    args = parse_args(parser, argv, smoke={"seconds": 4.0, "window": 8, "stride": 4, "max_new_tokens": 2})
    window, stride = args.window, args.stride
    if args.seconds * FPS < window + stride:
        sys.exit(f"--seconds {args.seconds:g} is too short: two windows need {(window + stride) / FPS:g} s "
                 f"at {FPS:g} fps")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = write_test_clip(tmp / "clip.mp4", args.seconds, size=(640, 360), rate=30)
        model = checkpoint(args.model, tmp)
        # One thread, as in the CPU model worker (Ray gives a num_cpus=1 actor one OpenMP
        # thread): the same work as the pipeline, and no thread oversubscription.
        torch.set_num_threads(1)
        vlm = SlowFastVLM.from_pretrained(model, device="cpu")
        decode_s, frames, decoded = measure_decode(clip, vlm.config.image_size)
        m = measure_model(vlm, frames, args.max_new_tokens, window, stride)
        del frames
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            p = measure_pipeline(clip, model, args.max_new_tokens, tmp / "out", window, stride)
            if args.workers > 1:  # each worker one core's worth of the CPUs, ingest actors beside them
                cpus = max(0.25, ((os.cpu_count() or 1) - 0.25 * args.workers) / args.workers)
                split = measure_pipeline(clip, model, args.max_new_tokens, tmp / "out-split", window, stride,
                                         workers=args.workers, worker_cpus=cpus, ingest_cpus=0.25,
                                         split_min_s=args.split_min_s)
                begin = time.perf_counter()
                plan = scan_samples(str(clip), FPS)
                scan_s = time.perf_counter() - begin
        finally:
            ray.shutdown()

    scale = HOUR / args.seconds
    hour_windows = expected_windows(round(HOUR * FPS), window, stride)
    hour_summaries = -(-hour_windows // m["every"])
    per_window = m["caption_s"] / (m["windows"] - 1)
    per_summary = (m["summary_s"] + m["final_s"]) / max(1, m["summaries"] + FinalSummary.rounds_needed(m["summaries"]))
    final_tasks = sum(-(-hour_summaries // 8 ** k) for k in range(1, FinalSummary.rounds_needed(hour_summaries) + 1))
    hour_model = hour_windows * per_window + (hour_summaries + final_tasks) * per_summary
    hour_decode = decode_s * scale
    hour_pipeline = p["steady_s"] * (hour_windows / (p["windows"] - 1))
    cores = os.cpu_count()
    print(f"clip {args.seconds:g} s (30 fps H.264 640x360, B-frames): {m['windows']} windows, "
          f"{m['summaries']} rolling summaries (every {m['every']} windows) + final; {decoded} of "
          f"{int(args.seconds * 30)} frames decoded (skip_nonref); CPU {cores} cores, torch {torch.__version__}")
    print(f"MEASURED on this CPU, model {args.model or 'tiny'}, scaled x{scale:.0f} to one hour "
          f"({hour_windows} windows, {hour_summaries} rolling summaries, {final_tasks} final-summary calls):")
    print(f"  decode alone        {decode_s:8.1f} s for the clip -> {hour_decode:8.0f} s per hour")
    print(f"  model alone         {m['caption_s'] + m['summary_s'] + m['final_s']:8.1f} s for the clip (from window 1) -> {hour_model:8.0f} s per hour "
          f"({per_window:.2f} s/window, {per_summary:.2f} s/summary)")
    print(f"  pipeline (Ray+Redis) {p['steady_s']:7.1f} s steady for {p['windows']} windows -> {hour_pipeline:8.0f} s "
          f"per hour; start-up {p['startup_s']:.0f} s once")
    print(f"  overhead            {hour_pipeline - hour_decode - hour_model:8.0f} s per hour (pipeline - decode - model; "
          f"negative = decoding overlaps the model)")
    print(f"  ONE HOUR: {hour_pipeline + p['startup_s']:.0f} s ({(hour_pipeline + p['startup_s']) / HOUR:.2f}x real time)")

    # Derived: the 7B model on one GPU, from the model bench's figures measured on an H200
    # (README, Sizing): windows/s of the whole per-window step at a batch of 32, and the
    # tower's frames/s. A text-only summary costs a window's step without its 16 frames.
    gpu_window = 1.0 / args.gpu_windows_per_s
    gpu_summary = max(0.0, gpu_window - stride / args.gpu_tower_fps)
    gpu_model = hour_windows * gpu_window + (hour_summaries + final_tasks) * gpu_summary
    gpu_decode = hour_decode * cores / args.gpu_host_cores  # this CPU's core-seconds, spread
    print(f"DERIVED for one GPU, 7B bf16, from measured H200 figures ({args.gpu_windows_per_s:g} windows/s at "
          f"batch 32, tower {args.gpu_tower_fps:g} frames/s), decoding on {args.gpu_host_cores} host cores at this "
          f"CPU's per-core rate:")
    print(f"  model {gpu_model:.0f} s ({gpu_window * 1000:.0f} ms/window, {gpu_summary * 1000:.0f} ms/summary), "
          f"decode {gpu_decode:.0f} s in parallel")
    print(f"  ONE HOUR: ~{max(gpu_model, gpu_decode):.0f} s (the larger of the two; they overlap)")
    if args.workers > 1:
        print_split(args, p, split, scan_s, plan.frames if plan else 0, scale, gpu_model, gpu_decode)


def print_split(args: argparse.Namespace, one: dict, split: dict, scan_s: float, frames: int, scale: float,
                gpu_model: float, gpu_decode: float) -> None:
    """Measured: 1 against N workers here; derived: N GPUs for one hour."""
    n = args.workers
    if split["split"] is None:
        sys.exit(f"the clip was not split over {n} workers: give more --seconds or a smaller --split-min-s")
    speedup = one["wall_s"] / split["wall_s"]
    print(f"SPLIT over {n} model workers: {split['split']} ({frames} sampled frames)")
    print(f"  MEASURED on this CPU ({os.cpu_count()} cores): 1 worker {one['wall_s']:.1f} s, {n} workers "
          f"{split['wall_s']:.1f} s wall for the clip (model loading included) -> {speedup:.2f}x (ideal {n}x)")
    print(f"  packet scan (plans the segments, before they start) {scan_s:.2f} s for the clip -> "
          f"{scan_s * scale:.0f} s per hour")
    hour_frames = round(HOUR * FPS)
    segments = plan_segments(hour_frames, args.window, args.stride, FPS, args.split_min_s, n)
    preroll = max(0, len(segments) - 1) * (args.window - args.stride) / args.gpu_tower_fps
    gpu_n = (gpu_model + preroll) / n
    print(f"  DERIVED for {n} GPUs (the one-GPU figures above): {len(segments)} segments; model "
          f"{gpu_model:.0f} s / {n} + {preroll:.1f} s of pre-roll frames re-encoded = {gpu_n:.0f} s, decode "
          f"{gpu_decode:.0f} s on the same host cores in parallel, scan {scan_s * scale:.0f} s first")
    print(f"  ONE HOUR on {n} GPUs: ~{scan_s * scale + max(gpu_n, gpu_decode):.0f} s "
          f"(against ~{max(gpu_model, gpu_decode):.0f} s on one)")


if __name__ == "__main__":
    main()
