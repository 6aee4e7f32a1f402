"""Test media made with PyAV: frames carry their own index as a barcode, plus an RTSP server.

The barcode is a 4x4 grid of black/white cells (16 bits, LSB first) inside the central
square of the picture, so it survives H.264 compression, scaling and a center crop.
"""

from __future__ import annotations

import functools
import http.server
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from bench.rtsp import RtspServer, rtsp_server_available
from tests.support.system_parts import missing_part

# Only fixtures: tests/conftest.py star-imports this module; tests import helpers by name.
__all__ = ["http_media", "media_dir", "rtsp_server_factory"]

GRID = 4
BLACK, WHITE, BACKGROUND = 16, 235, 128
TIME_BASE = Fraction(1, 90000)  # exact for 25, 30 and 60 fps


def barcode_image(index: int, width: int, height: int) -> np.ndarray:
    """RGB picture whose central square shows `index` as GRID x GRID cells."""
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    side = min(width, height) * 3 // 4
    x0, y0 = (width - side) // 2, (height - side) // 2
    cell = side / GRID
    for bit in range(GRID * GRID):
        r, c = divmod(bit, GRID)
        value = WHITE if (index >> bit) & 1 else BLACK
        img[y0 + int(r * cell) : y0 + int((r + 1) * cell), x0 + int(c * cell) : x0 + int((c + 1) * cell)] = (
            value
        )
    return img


def decode_index(image: np.ndarray) -> int:
    """Inverse of barcode_image on a frame that shows the central square (any scale)."""
    h, w = image.shape[:2]
    side = min(w, h) * 3 / 4
    x0, y0 = (w - side) / 2, (h - side) / 2
    cell = side / GRID
    gray = image.mean(axis=2) if image.ndim == 3 else image
    index = 0
    for bit in range(GRID * GRID):
        r, c = divmod(bit, GRID)
        cy, cx = int(y0 + (r + 0.5) * cell), int(x0 + (c + 0.5) * cell)
        q = max(1, int(cell / 4))
        if gray[cy - q : cy + q + 1, cx - q : cx + q + 1].mean() > BACKGROUND:
            index |= 1 << bit
    return index


@dataclass(frozen=True)
class Clip:
    path: Path
    times: list[float]  # presentation time of frame i, seconds (frame i shows index i)
    width: int
    height: int


def make_clip(
    path: Path,
    times: Sequence[float],
    width: int = 160,
    height: int = 120,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    audio: bool = False,
) -> Clip:
    """Encode frames i=0..n-1 at times[i] (seconds); B-frames on by default for H.264."""
    if options is None:
        options = {"preset": "veryfast", "bf": "2", "g": "30"} if codec == "libx264" else {}
    pts = [round(t / TIME_BASE) for t in times]
    with av.open(str(path), "w") as out:
        rate = max(1, round(len(times) / max(times[-1], 1e-3))) if len(times) > 1 else 25
        stream = out.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = TIME_BASE
        stream.time_base = TIME_BASE
        for i, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(barcode_image(i, width, height), format="rgb24")
            frame.pts, frame.time_base = p, TIME_BASE
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if audio:
            _add_silence(out, times[-1])
    return Clip(path, [p * float(TIME_BASE) for p in pts], width, height)


def _add_silence(out: av.container.OutputContainer, seconds: float, rate: int = 16000) -> None:
    stream = out.add_stream("aac", rate=rate, layout="mono")
    samples, n = round(seconds * rate), 1024
    for start in range(0, samples, n):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def make_audio_only(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as out:
        _add_silence(out, seconds)
    return path


def make_unsupported_codec(path: Path) -> Path:
    """An AVI whose video FourCC no decoder knows (MPEG-4 Part 2 relabelled)."""
    tmp = path.with_suffix(".tmp.avi")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(barcode_image(i, 64, 48), format="rgb24")))
        out.mux(stream.encode())
    path.write_bytes(tmp.read_bytes().replace(b"FMP4", b"QQQQ"))
    tmp.unlink()
    return path


def damage(src: Path, dst: Path, *, keep: float = 1.0, garbage: tuple[float, int] | None = None) -> Path:
    """Copy keeping the first `keep` fraction of bytes; `garbage=(where, n)` overwrites n
    bytes at fraction `where` with fixed random noise (a damaged recording)."""
    data = bytearray(src.read_bytes())
    if garbage is not None:
        start, n = int(len(data) * garbage[0]), garbage[1]
        data[start : start + n] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data[: int(len(data) * keep)]))
    return dst


def cfr_times(fps: float, seconds: float) -> list[float]:
    return [i / fps for i in range(round(fps * seconds))]


def reference_sample(times: Sequence[float], fps: float) -> list[int]:
    """The sampling rule, stated simply: for each tick k/fps the first frame at or after it,
    each frame at most once (ticks that fall in a gap share the frame after the gap)."""
    picked: list[int] = []
    tick = 0
    for i, t in enumerate(times):
        if t >= tick / fps - 1e-3:  # 1 ms tolerance: containers round timestamps
            picked.append(i)
            tick = int(np.floor((t + 1e-3) * fps)) + 1
    return picked


def set_rotation(src: Path, dst: Path, degrees: int) -> Path:
    """Remux with display-matrix rotation metadata (the way phones write portrait video)."""
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-y",
            "-i",
            str(src),
            "-c",
            "copy",
            "-metadata:s:v:0",
            f"rotate={degrees}",
            str(dst),
        ],
        check=True,
    )
    return dst


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_media(media_dir: Path) -> Iterator[str]:
    """A real HTTP server on a loopback port serving media_dir; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(media_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- RTSP server -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rtsp_server_factory() -> Iterator[type[RtspServer]]:
    if not rtsp_server_available():
        missing_part("gst-rtsp-server", "make system-deps")
    started: list[RtspServer] = []

    class Tracked(RtspServer):
        def start(self, timeout: float = 10.0) -> RtspServer:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for server in started:
        server.stop()


def read_vtt_cues(path: Path) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue as FFmpeg's WebVTT demuxer reads the file."""
    with av.open(str(path)) as container:
        stream = container.streams.subtitles[0]
        return [
            (float(p.pts * p.time_base), float((p.pts + p.duration) * p.time_base), bytes(p).decode())
            for p in container.demux(stream) if p.pts is not None
        ]
