"""Decode throughput of our video source against `ffmpeg -i X -f null -` on the same file.

    .venv/bin/python -m bench.decode_bench                 # generates a 1080p H.264 clip
    .venv/bin/python -m bench.decode_bench --input my.mp4  # or measures yours

Rows (best of --repeat runs, frames/s = decoded frames / wall time):
  ffmpeg        the ffmpeg CLI on PATH decoding every frame to the null muxer (the baseline)
  pyav decode   PyAV decoding every frame with threads, nothing else (our floor)
  source        open_source(fps=4, size=576): every frame decoded, 4 fps sampled,
                resized + center-cropped to 576x576 RGB
  source skip_nonref  the same with skip_nonref=True (what the pipeline runs on files):
                non-reference frames are not decoded; frames/s counts the file's frames
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import av

from bench.common import parse_args, write_test_clip
from connectors.sources import open_source


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    """(best wall seconds, frames decoded) over `repeat` runs."""
    times, frames = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        frames = run()
        times.append(time.perf_counter() - started)
    return min(times), frames


def run_ffmpeg(exe: str, path: Path, frames: int) -> Callable[[], int]:
    def run() -> int:
        subprocess.run(
            [exe, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "null", "-"], check=True
        )
        return frames

    return run


def run_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def run_source(path: Path, fps: float, size: int, skip_nonref: bool = False, file_frames: int = 0) -> Callable[[], int]:
    """Frames of the file covered (with skip_nonref, fewer are decoded: the file's count is reported)."""
    def run() -> int:
        with open_source(path, fps=fps, size=size, skip_nonref=skip_nonref) as src:
            for _ in src:
                pass
            return file_frames if skip_nonref else src.stats.decoded

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, help="video to measure (default: generate a 1080p H.264 clip)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the generated clip")
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=576)
    parser.add_argument("--repeat", type=int, default=3)
    args = parse_args(parser, argv, smoke={"seconds": 0.5, "repeat": 1})
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("ffmpeg is not on PATH: it is this bench's baseline (apt-get install ffmpeg)")
    if args.input and not args.input.is_file():
        sys.exit(f"no such file: {args.input}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.input or write_test_clip(Path(tmp) / "bench_1080p.mp4", args.seconds)
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            desc = (
                f"{s.codec_context.name} {s.width}x{s.height}, {c.duration / 1e6 if c.duration else 0:.1f} s"
            )
        ffmpeg_version = subprocess.run(
            [ffmpeg, "-version"], capture_output=True, text=True, check=True
        ).stdout.split()[2]
        pyav_frames = run_pyav(path)
        rows = [
            ("ffmpeg -f null", *best_of(args.repeat, run_ffmpeg(ffmpeg, path, pyav_frames))),
            ("pyav decode", *best_of(args.repeat, lambda: run_pyav(path))),
            (
                f"source {args.fps:g} fps @{args.size}",
                *best_of(args.repeat, run_source(path, args.fps, args.size)),
            ),
            (
                "source skip_nonref",
                *best_of(args.repeat, run_source(path, args.fps, args.size, True, pyav_frames)),
            ),
        ]
    print(f"file: {desc}, {pyav_frames} frames; cores: {os.cpu_count()}")
    print(f"ffmpeg CLI {ffmpeg_version}; PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info})")
    baseline = pyav_frames / rows[0][1]
    for name, seconds, frames in rows:
        rate = frames / seconds
        print(f"{name:<22} {seconds:7.2f} s  {rate:8.1f} frames/s  {rate / baseline:5.2f}x ffmpeg")


if __name__ == "__main__":
    main()
