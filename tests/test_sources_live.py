"""Live and network sources against real servers: gst-rtsp-server, an HTTP server, loop://."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.sources import Frame, SourceError, SourceState, VideoSource, open_source
from tests.support.media import Clip, RtspServer, cfr_times, decode_index, free_port, make_clip

FAST_RETRY = {"backoff_initial": 0.1, "backoff_max": 0.4, "open_timeout": 5.0, "read_timeout": 3.0}


@pytest.fixture(scope="module")
def camera_clip(media_dir: Path) -> Clip:
    """30 s at 25 fps with a keyframe every 10 frames, so a joining client starts fast."""
    return make_clip(
        media_dir / "camera.mp4", cfr_times(25, 30), options={"preset": "veryfast", "bf": "2", "g": "10"}
    )


class Reader:
    """Iterates a source in a thread, as the pipeline does, so the test can watch it."""

    def __init__(self, src: VideoSource) -> None:
        self.src, self.frames, self.error = src, list[Frame](), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for frame in self.src:
                self.frames.append(frame)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self) -> None:
        """Close the source; the reading thread must end. The generous join bounds a hang
        (a reader that reconnects forever), not the machine's speed."""
        self.src.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture
def reader() -> Iterator[Callable[[VideoSource], Reader]]:
    readers: list[Reader] = []
    yield lambda src: readers.append(Reader(src)) or readers[-1]
    for r in readers:
        r.stop()


def test_rtsp_reconnects_after_server_restart(
    camera_clip: Clip, rtsp_server_factory: type[RtspServer], reader: Callable[[VideoSource], Reader]
) -> None:
    server = rtsp_server_factory(camera_clip.path).start()
    src = open_source(server.url(), fps=5.0, size=64, **FAST_RETRY)
    assert src.state is SourceState.LIVE and src.is_live
    r = reader(src)
    wait_for(lambda: len(r.frames) >= 8)
    first = [decode_index(f.image) for f in r.frames[:8]]
    assert first == [5 * k for k in range(8)]  # 25 fps served, 5 fps sampled, in order

    server.stop()  # camera loses power
    wait_for(lambda: src.state is SourceState.RECONNECTING and src.stats.reconnects >= 2)
    assert src.stats.attempt >= 2 and src.stats.last_error == "connection refused"
    seen = len(r.frames)

    server.start()  # camera is back on the same address
    wait_for(lambda: len(r.frames) >= seen + 5)
    assert src.state is SourceState.LIVE and src.stats.attempt == 0 and r.error is None
    assert [f.seq for f in r.frames] == list(range(len(r.frames)))
    pts = [f.pts for f in r.frames]
    assert all(b > a for a, b in itertools.pairwise(pts))
    assert pts[seen] - pts[seen - 1] >= 0.5  # the outage shows in stream time
    r.stop()
    assert src.state is SourceState.ENDED and r.error is None


def test_rtsp_stall_times_out_and_recovers(
    camera_clip: Clip, rtsp_server_factory: type[RtspServer], reader: Callable[[VideoSource], Reader]
) -> None:
    server = rtsp_server_factory(camera_clip.path).start()
    assert server.proc is not None
    quick = FAST_RETRY | {"open_timeout": 1.0, "read_timeout": 1.0}
    src = open_source(server.url(), fps=5.0, size=64, **quick)
    r = reader(src)
    wait_for(lambda: len(r.frames) >= 3)
    server.proc.send_signal(signal.SIGSTOP)  # the network goes silent, no FIN, no RST
    try:
        wait_for(lambda: src.state is SourceState.RECONNECTING, timeout=5.0)
        assert src.stats.last_error == "timed out"
    finally:
        server.proc.send_signal(signal.SIGCONT)
    seen = len(r.frames)
    wait_for(lambda: len(r.frames) >= seen + 3)
    assert src.state is SourceState.LIVE
    reconnects = src.stats.reconnects
    server.proc.send_signal(signal.SIGSTOP)  # silent again: the blocked read's timeout must end it
    try:
        time.sleep(0.3)
        r.stop()
        # Closed while blocked: the read timed out and the source ended instead of reconnecting.
        assert src.state is SourceState.ENDED and src.stats.reconnects == reconnects and r.error is None
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_rtsp_udp_transport(camera_clip: Clip, rtsp_server_factory: type[RtspServer]) -> None:
    server = rtsp_server_factory(camera_clip.path).start()
    with open_source(server.url(), fps=5.0, size=64, transport="udp", **FAST_RETRY) as src:
        frames = [f for _, f in zip(range(4), src)]
    assert [decode_index(f.image) for f in frames] == [0, 5, 10, 15]


def test_rtsp_auth(camera_clip: Clip, rtsp_server_factory: type[RtspServer]) -> None:
    server = rtsp_server_factory(camera_clip.path, credentials="viewer:letmein").start()
    for userinfo in ("viewer:wrong-pass", None):
        with pytest.raises(SourceError, match="authorization refused") as err:
            open_source(server.url(userinfo), **FAST_RETRY)
        assert "wrong-pass" not in "".join(
            traceback.format_exception(err.value)
        ) and f"127.0.0.1:{server.port}/cam" in str(err.value)
    with open_source(server.url("viewer:letmein"), fps=5.0, size=64, **FAST_RETRY) as src:
        assert decode_index(next(iter(src)).image) == 0


def test_connection_refused_at_start() -> None:
    uri = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/cam"
    with pytest.raises(SourceError, match="connection refused") as err:
        open_source(uri, **FAST_RETRY)
    assert "admin:***@" in str(err.value)
    assert "hunter2" not in "".join(traceback.format_exception(err.value))  # chained errors too


def test_retry_connect_waits_for_the_camera(
    camera_clip: Clip, rtsp_server_factory: type[RtspServer], reader: Callable[[VideoSource], Reader]
) -> None:
    server = rtsp_server_factory(camera_clip.path)
    src = open_source(server.url(), fps=5.0, size=64, retry_connect=True, **FAST_RETRY)
    assert src.state is SourceState.CONNECTING
    r = reader(src)
    wait_for(lambda: src.stats.attempt >= 2)
    assert src.state is SourceState.CONNECTING and src.stats.last_error == "connection refused"
    server.start()
    wait_for(lambda: len(r.frames) >= 2)
    assert src.state is SourceState.LIVE


def test_gives_up_after_max_attempts() -> None:
    src = open_source(
        f"rtsp://127.0.0.1:{free_port()}/cam", retry_connect=True, max_attempts=2, backoff_initial=0.05
    )
    with pytest.raises(SourceError, match="gave up after 2 attempts: connection refused"):
        list(src)
    assert src.state is SourceState.FAILED and src.stats.reconnects == 2


def test_close_interrupts_backoff(reader: Callable[[VideoSource], Reader]) -> None:
    src = open_source(
        f"rtsp://127.0.0.1:{free_port()}/cam", retry_connect=True, backoff_initial=300.0, backoff_max=600.0
    )
    r = reader(src)
    wait_for(lambda: src.stats.attempt == 1)
    r.stop()  # the reader ends within its 30 s join: ten times inside the 300 s backoff
    assert src.state is SourceState.ENDED


def test_loop_is_a_live_fake_camera(media_dir: Path) -> None:
    clip = make_clip(media_dir / "loop.mp4", cfr_times(10, 1))  # 10 frames, 1 s
    with open_source(f"loop://{clip.path}", fps=10.0, size=64, realtime=False) as src:
        assert src.is_live
        frames = [f for _, f in zip(range(25), src)]
    assert [decode_index(f.image) for f in frames] == [i % 10 for i in range(25)]
    assert [f.pts for f in frames] == pytest.approx([i / 10 for i in range(25)], abs=1e-3)
    assert [f.source_index for f in frames] == list(range(25))
    started = time.monotonic()
    with open_source(clip.path, loop=True, fps=10.0, size=64) as src:  # real time by default
        frames = [f for _, f in zip(range(6), src)]
    assert time.monotonic() - started >= 0.45  # paced: 6 frames at 10 fps take 0.5 s, never less


def test_http_file_and_hls(http_media: str, media_dir: Path) -> None:
    clip = make_clip(media_dir / "web.ts", cfr_times(30, 6))
    with open_source(f"{http_media}/web.ts", fps=4.0, size=64) as src:
        assert not src.is_live
        frames = list(src)
    assert [decode_index(f.image) for f in frames] == [int(-(-7.5 * k // 1)) for k in range(24)]
    hls = media_dir / "hls"
    hls.mkdir()
    subprocess.run(
        [
            "ffmpeg",
            "-loglevel",
            "error",
            "-i",
            str(clip.path),
            "-c",
            "copy",
            "-f",
            "hls",
            "-hls_time",
            "2",
            "-hls_playlist_type",
            "vod",
            str(hls / "index.m3u8"),
        ],
        check=True,
    )
    with open_source(f"{http_media}/hls/index.m3u8", fps=4.0, size=64) as src:
        hls_frames = list(src)
        assert src.state is SourceState.ENDED and not src.is_live
    assert [decode_index(f.image) for f in hls_frames] == [decode_index(f.image) for f in frames]
    with pytest.raises(SourceError, match="not found on the server"):
        open_source(f"{http_media}/nothing-here.mp4")
