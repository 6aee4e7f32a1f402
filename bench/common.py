"""What more than one bench needs: the smoke mode, a generated camera-like clip, the
checkpoint to measure, the device's name, percentiles and growth rates."""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

if TYPE_CHECKING:
    import torch


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               smoke: dict[str, Any]) -> argparse.Namespace:
    """`parser`'s arguments plus --smoke, which makes `smoke` the defaults (flags given still win)."""
    parser.add_argument("--smoke", action="store_true",
                        help="smallest sizes, seconds long: shows the bench runs (its figures mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def write_test_clip(path: Path, seconds: float, size: tuple[int, int] = (1920, 1080), rate: int = 30) -> Path:
    """Moving texture + noise, H.264 with B-frames (libx264 veryfast, crf 23): decodes like a
    real camera file. `size` is (width, height)."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = ((xx // 8 + yy // 8) % 64 * 4).astype(np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * rate)):
            luma = np.roll(base, 4 * i, axis=1) + rng.integers(0, 16, (h, w), dtype=np.uint8)
            rgb = np.repeat(luma[:, :, None], 3, axis=2)
            rgb[:, :, 0] = np.roll(rgb[:, :, 0], 3 * i, axis=0)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


# torch is imported where it is used: the benches without a model (search, soak, decode, gate)
# import this module, and torch would cost each of them seconds and hundreds of MB.


def checkpoint(model: str | None, scratch: Path) -> str:
    """`model`, else the random-weight checkpoint written under `scratch`."""
    from model.random_checkpoint import write_random_checkpoint

    return model or str(write_random_checkpoint(scratch / "random-checkpoint"))


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def slope_per_hour(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour."""
    mt, my = statistics.mean(ts), statistics.mean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if not var else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600
