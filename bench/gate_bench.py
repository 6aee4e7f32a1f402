"""The scene gate on a camera that mostly shows nothing new: how many windows reach the model
(GPU windows per camera-hour) and how many frames the tower encodes, with and without the gate.

The clip: a static noisy scene of the synthetic world with two 8-second visits of a red circle,
sampled at 4 fps into 16-frame windows at stride 8, as a live camera would be. The gate's
decisions depend on the frames alone, not on the model or the device, so the counts here are
measured (on the CPU) and hold on any GPU; windows per hour are those counts scaled to an hour.

    python -m bench.gate_bench [--minutes 4] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from connectors.sources import open_source
from pipeline.gate import DEFAULT_THRESHOLD, StreamGate
from pipeline.window import FrameRef, SlidingWindow
from world.scenes import Scene, WorldObject, write_scene_file

from .common import parse_args

SCENE_S = 2.0
PALETTE = ((40, 40, 40), (0, 0, 0))  # a background the shipped world model reads well
VISIT_S = 8.0


def visits_for(seconds: float) -> tuple[tuple[float, float], ...]:
    """Two visits, at a quarter and at two thirds of the clip."""
    return tuple((at, at + VISIT_S) for at in (round(seconds / 4 / SCENE_S) * SCENE_S,
                                                round(seconds * 2 / 3 / SCENE_S) * SCENE_S))


def visit_clip(path: Path, seconds: float) -> Path:
    """The static noisy scene for `seconds`, a red circle visiting twice (`visits_for`)."""
    circle = WorldObject("red", "circle", "stays still", 0.15, (0.5, 0.5), (0.5, 0.5), (0, 0, 0))
    static, visited = Scene((), "noise", PALETTE, 5), Scene((circle,), "noise", PALETTE, 5)
    visits = visits_for(seconds)
    scenes = [visited if any(a <= k * SCENE_S < b for a, b in visits) else static
              for k in range(int(seconds / SCENE_S))]
    return write_scene_file(path, scenes, seconds_per_scene=SCENE_S, fps=8, size=(320, 180))


def count(clip: Path, gated: bool, window: int, stride: int, fps: float, refresh: int) -> tuple[int, int, int, int]:
    """(windows, windows to the model, frames sampled, frames the tower would encode)."""
    windows, to_model, frames, encoded = 0, 0, 0, set()
    slider = SlidingWindow("bench", window, stride, live=True)
    gate = StreamGate(DEFAULT_THRESHOLD, refresh, window) if gated else None
    with open_source(clip, fps=fps, size=224, realtime=False, live=False) as source:
        for frame in source:
            frames += 1
            if gate is not None:
                gate.add_frame(frame.seq, frame.image)
            emitted = slider.push(FrameRef(frame.seq, frame.pts, frame.wall_time, None))
            if emitted is None:
                continue
            windows += 1
            if gate is not None and gate.mark(emitted).gated:
                continue
            to_model += 1
            encoded |= {f.seq for f in emitted.frames}  # the feature ring encodes each frame once
    return windows, to_model, frames, len(encoded)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gate_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--refresh", type=int, default=10, help="gate.refresh_every_n_windows")
    args = parse_args(parser, argv, smoke={"minutes": 1.0})
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        clip = visit_clip(Path(tmp) / "visits.mp4", seconds)
        print(f"clip: {args.minutes:g} min static noisy scene, red circle visits at {visits_for(seconds)} s; "
              f"window {args.window}, stride {args.stride}, {args.fps:g} fps; device: CPU (the counts hold on any)")
        rows = {}
        for gated in (False, True):
            windows, to_model, frames, encoded = count(clip, gated, args.window, args.stride, args.fps, args.refresh)
            rows[gated] = (to_model, encoded)
            per_hour = to_model * 3600 / seconds
            print(f"{'with' if gated else 'without'} gate: {to_model} of {windows} windows to the model "
                  f"({per_hour:.0f} GPU windows per camera-hour, derived), {encoded} of {frames} frames encoded")
        print(f"gate / no gate: windows {rows[True][0] / rows[False][0]:.3f}, frames {rows[True][1] / rows[False][1]:.3f}")


if __name__ == "__main__":
    main()
