"""A real RTSP server in its own process (bench/rtsp_server.py under Debian's python3, which has
GStreamer's bindings), for the benches and the tests."""

from __future__ import annotations

import select
import signal
import subprocess
from pathlib import Path

import av

from connectors.embedded import free_port

RTSP_SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # GStreamer's Python bindings come from Debian's python3-gi


def rtsp_server_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    return (
        Path(SYSTEM_PYTHON).exists()
        and subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, check=False).returncode == 0
    )


class RtspServer:
    """gst-rtsp-server in its own process serving one H.264 clip at rtsp://127.0.0.1:PORT/cam:
    an mp4 once, or with `loop_fps` a raw H.264 clip (write_loop_clip) forever."""

    def __init__(self, clip: Path, port: int | None = None, credentials: str | None = None,
                 loop_fps: int | None = None) -> None:
        self.clip, self.port, self.credentials, self.loop_fps = clip, port or free_port(), credentials, loop_fps
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, userinfo: str | None = None) -> str:
        auth = f"{userinfo}@" if userinfo else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}/cam"

    def start(self, timeout: float = 10.0) -> RtspServer:
        cmd = [SYSTEM_PYTHON, str(RTSP_SERVER_SCRIPT), str(self.port), str(self.clip)]
        if self.credentials:
            cmd.append(self.credentials)
        if self.loop_fps:
            cmd += ["--loop-fps", str(self.loop_fps)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""  # "ready" once it listens
        if b"ready" not in line:
            self.stop()
            raise RuntimeError(f"RTSP server did not start: {line!r}")
        return self

    def stop(self) -> None:
        """Kill -9, like a camera losing power: no TEARDOWN, the socket just dies."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


def write_loop_clip(source: Path, path: Path) -> tuple[Path, int]:
    """`source` re-encoded as raw H.264 without B-frames, for RtspServer(loop_fps=...); returns
    the path and the frame rate it plays at."""
    with av.open(str(source)) as inp, av.open(str(path), "w", format="h264") as out:
        video = inp.streams.video[0]
        fps = round(video.average_rate)
        encoded = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "bf": "0", "g": str(2 * fps)})
        encoded.width, encoded.height, encoded.pix_fmt = video.codec_context.width, video.codec_context.height, "yuv420p"
        for frame in inp.decode(video):
            frame.pts = None
            out.mux(encoded.encode(frame))
        out.mux(encoded.encode())
    return path, fps
