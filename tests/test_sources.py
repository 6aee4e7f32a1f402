"""Video sources on real files made by PyAV: sampling, scaling, bad inputs, helpers."""

from __future__ import annotations

import itertools
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from connectors.sources import Frame, SourceError, SourceState, open_source, redact_uri
from connectors.sources.backoff import Backoff
from connectors.redact import redact_text
from connectors.sources.sampling import RateSampler
from connectors.sources.timeline import Timeline
from tests.support.media import (
    Clip,
    cfr_times,
    damage,
    decode_index,
    make_audio_only,
    make_clip,
    make_unsupported_codec,
    reference_sample,
    set_rotation,
)

SMALL = 64  # output size for most tests: scaling cost stays negligible


def read_all(uri: str | Path, **kwargs: object) -> list[Frame]:
    kwargs.setdefault("size", SMALL)
    with open_source(uri, **kwargs) as src:  # type: ignore[arg-type]
        frames = list(src)
        assert src.state is SourceState.ENDED
        assert src.stats.sampled == len(frames)
    return frames


def assert_well_formed(frames: list[Frame]) -> None:
    assert [f.seq for f in frames] == list(range(len(frames)))
    pts = [f.pts for f in frames]
    assert all(b > a for a, b in itertools.pairwise(pts)), "pts must strictly increase"
    assert all(f.image.dtype == np.uint8 and f.image.flags.c_contiguous for f in frames)


@pytest.fixture(scope="module")
def cfr(media_dir: Path) -> Clip:
    """10 s of 30 fps H.264 with B-frames: 300 frames."""
    return make_clip(media_dir / "cfr.mp4", cfr_times(30, 10))


@pytest.fixture(scope="module")
def vfr(media_dir: Path) -> Clip:
    """Matroska (1 ms timestamps), variable rate: 30 fps, then 5 fps, a 3 s gap, then 12 fps."""
    times = [i / 30 for i in range(60)] + [2 + i / 5 for i in range(10)] + [7 + i / 12 for i in range(24)]
    return make_clip(media_dir / "vfr.mkv", times)


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (1.0, list(range(0, 300, 30))),
        (4.0, [int(np.ceil(7.5 * k)) for k in range(40)]),
        (30.0, list(range(300))),
    ],
)
def test_cfr_sampling(cfr: Clip, fps: float, expected: list[int]) -> None:
    frames = read_all(cfr.path, fps=fps)
    assert [f.source_index for f in frames] == expected
    assert [decode_index(f.image) for f in frames] == expected  # the pixels agree
    assert [f.pts for f in frames] == pytest.approx([cfr.times[i] for i in expected], abs=1e-3)
    assert_well_formed(frames)


@pytest.mark.parametrize("fps", [1.0, 4.0, 30.0])
def test_vfr_sampling_follows_timestamps(vfr: Clip, fps: float) -> None:
    frames = read_all(vfr.path, fps=fps)
    expected = reference_sample(vfr.times, fps)
    assert [decode_index(f.image) for f in frames] == expected
    assert [f.pts for f in frames] == pytest.approx([vfr.times[i] for i in expected], abs=2e-3)
    assert_well_formed(frames)
    if fps == 4.0:  # the gap yields one frame after it, no burst of duplicates
        assert [f.pts for f in frames if 4 < f.pts < 7.3] == pytest.approx([7.0, 7 + 3 / 12], abs=2e-3)


def test_default_output_is_576_rgb(cfr: Clip) -> None:
    with open_source(cfr.path, fps=1.0) as src:
        frame = next(iter(src))
    assert frame.image.shape == (576, 576, 3) and frame.image.dtype == np.uint8
    copy = pickle.loads(pickle.dumps(frame))  # crosses process boundaries (Ray object store)
    assert copy.seq == frame.seq and np.array_equal(copy.image, frame.image)
    assert decode_index(frame.image) == 0
    assert src.state is SourceState.ENDED  # left the with-block: closed


@pytest.mark.parametrize(
    ("name", "width", "height", "codec", "pix_fmt"),
    [
        ("odd.mp4", 641, 479, "libx264", "yuv444p"),  # 4:2:0 needs even sizes
        ("odd.webm", 641, 479, "libvpx-vp9", "yuv420p"),
        ("portrait.mov", 120, 160, "libx264", "yuv420p"),
    ],
)
def test_sizes_and_containers(
    media_dir: Path, name: str, width: int, height: int, codec: str, pix_fmt: str
) -> None:
    options = {"deadline": "realtime", "cpu-used": "8"} if codec == "libvpx-vp9" else None
    clip = make_clip(media_dir / name, cfr_times(30, 1), width, height, codec, pix_fmt, options)
    frames = read_all(clip.path, fps=30.0)
    assert [decode_index(f.image) for f in frames] == list(range(30))
    assert all(f.image.shape == (SMALL, SMALL, 3) for f in frames)
    uncropped = read_all(clip.path, fps=1.0, crop=False)[0].image
    assert uncropped.shape[:2] == (
        (SMALL, round(width * SMALL / height)) if width > height else (round(height * SMALL / width), SMALL)
    )


def test_display_rotation_is_applied(media_dir: Path, cfr: Clip) -> None:
    rotated = set_rotation(cfr.path, media_dir / "rotated.mp4", 90)  # coded 160x120, shown 120x160
    uncropped = read_all(rotated, fps=1.0, crop=False)
    assert uncropped[0].image.shape == (round(160 * SMALL / 120), SMALL, 3)
    cropped = read_all(rotated, fps=1.0)
    # Upright picture: turning it back to the coded orientation recovers the barcode.
    assert [decode_index(np.rot90(f.image, -1)) for f in cropped] == list(range(0, 300, 30))


def test_uniform_frames_mode(cfr: Clip, media_dir: Path) -> None:
    frames = read_all(cfr.path, frames=64)
    expected = np.linspace(0, 299, 64).round().astype(int).tolist()
    assert [decode_index(f.image) for f in frames] == expected
    assert_well_formed(frames)
    short = make_clip(media_dir / "short.mp4", cfr_times(30, 0.2))  # 6 frames, 8 wanted
    frames = read_all(short.path, frames=8)
    assert [f.source_index for f in frames] == [0, 1, 1, 2, 3, 4, 4, 5]  # exactly N: repeats
    assert [f.seq for f in frames] == list(range(8))


def test_truncated_file_ends_cleanly(media_dir: Path) -> None:
    clip = make_clip(media_dir / "whole.ts", cfr_times(30, 10))
    frames = read_all(damage(clip.path, media_dir / "truncated.ts", keep=0.5), fps=30.0)
    indices = [decode_index(f.image) for f in frames]
    assert 100 < len(frames) < 200 and indices == list(range(len(frames)))
    assert_well_formed(frames)


def test_truncated_mp4_without_index_is_refused(cfr: Clip, media_dir: Path) -> None:
    broken = damage(cfr.path, media_dir / "truncated.mp4", keep=0.5)  # moov atom is at the end
    with pytest.raises(SourceError, match="not a readable media file") as err:
        open_source(broken)
    assert "truncated.mp4" in str(err.value)


def test_corrupt_packets_are_skipped_and_counted(media_dir: Path) -> None:
    clip = make_clip(media_dir / "clean.ts", cfr_times(30, 10))
    corrupt = damage(clip.path, media_dir / "corrupt.ts", garbage=(0.5, 20_000))
    with open_source(corrupt, fps=30.0, size=SMALL) as src:
        frames = list(src)
        stats = src.state, src.stats
    assert stats[0] is SourceState.ENDED and stats[1].corrupt_skipped >= 1
    assert_well_formed(frames)
    before = [decode_index(f.image) for f in frames if f.pts < 4.5]
    assert before == list(range(len(before)))
    # Past the damage (and the next keyframe) pictures and timestamps line up again.
    after = [f for f in frames if f.pts >= 7.0]
    assert len(after) == 90 and [decode_index(f.image) for f in after] == [round(f.pts * 30) for f in after]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.mp4", "file not found"),
        (lambda d: d, "not a regular file"),
        (lambda d: make_audio_only(d / "audio.m4a"), "no video stream"),
        (lambda d: make_unsupported_codec(d / "unknown.avi"), "unsupported video codec"),
        (
            lambda d: (d / "notes.mp4").write_text("not a video\n" * 100) and d / "notes.mp4",
            "not a readable media file",
        ),
        (lambda d: "ftp://user:hunter2@example.invalid/a.mp4", "unsupported URL scheme"),
    ],
    ids=["missing", "directory", "audio-only", "unsupported-codec", "not-media", "bad-scheme"],
)
def test_bad_inputs_fail_with_reason(tmp_path: Path, make: object, reason: str) -> None:
    uri = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(SourceError, match=reason) as err:
        open_source(uri)
    assert redact_uri(str(uri)) in str(err.value) and "hunter2" not in str(err.value)


def test_bad_options_fail(cfr: Clip) -> None:
    for kwargs in ({"fps": 0}, {"frames": 0}, {"transport": "sctp"}, {"size": 0}, {"backoff_jitter": 2}):
        with pytest.raises(SourceError):
            open_source(cfr.path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SourceError, match="loop=True applies to local files"):
        open_source("rtsp://127.0.0.1:1/x", loop=True)


def test_close_from_another_thread_stops_iteration(cfr: Clip) -> None:
    src = open_source(cfr.path, fps=30.0, size=SMALL)
    seen: list[Frame] = []
    for frame in src:
        seen.append(frame)
        if len(seen) == 5:
            closer = threading.Thread(target=src.close)
            closer.start()
            closer.join(timeout=60)  # close() has returned: the reader sees the stop on its next read
            assert not closer.is_alive()
    assert 5 <= len(seen) <= 6 and src.state is SourceState.ENDED
    with pytest.raises(RuntimeError, match="only once"):
        next(iter(src))


# --- the parts on their own ------------------------------------------------------------


def test_redact_uri() -> None:
    assert redact_uri("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert redact_uri("rediss://:pw@redis:6380/0") == "rediss://:***@redis:6380/0"
    assert redact_uri("https://cdn/x.m3u8?token=abc&quality=hd") == "https://cdn/x.m3u8?token=***&quality=hd"
    assert redact_uri("rtsp://cam/x") == "rtsp://cam/x"
    assert redact_uri("/videos/a@b.mp4") == "/videos/a@b.mp4"
    text = redact_text("failed: 'rtsp://u:p4ss@h/x' and http://h/?api_key=zz")
    assert "p4ss" not in text and "zz" not in text and "rtsp://u:***@h/x" in text


def test_rate_sampler_rules() -> None:
    sampler = RateSampler(4.0)
    times = [0.0, 0.1, 0.2499995, 0.3, 2.0, 2.01, 2.3]  # a near-tick frame, then a 1.7 s gap
    assert [t for i, t in enumerate(times) if sampler.take(t, i)] == [0.0, 0.2499995, 2.0, 2.3]
    slow = RateSampler(30.0)  # source slower than the target: every frame, once
    assert sum(slow.take(i / 10, i) for i in range(20)) == 20


def test_timeline_repairs_timestamps() -> None:
    line = Timeline(nominal_dt=0.1)
    line.restart(at=0.0, origin=5.0)  # stream starts at raw 5.0
    assert [line.map(t) for t in (5.0, 5.1, None, 5.3)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert line.map(5.25) == pytest.approx(0.3)  # small step back: clamped
    assert line.map(1.0) == pytest.approx(0.3)  # one stray frame far back: ignored
    assert line.map(5.4) == pytest.approx(0.4)
    assert [line.map(t) for t in (0.0, 0.1, 0.2, 0.3)] == pytest.approx([0.4, 0.4, 0.5, 0.6])  # clock reset
    live = Timeline(nominal_dt=0.1, max_forward_gap=10.0)
    assert [live.map(t) for t in (0.0, 0.1, 500.0, 500.1, 500.2, 500.3)] == pytest.approx(
        [0, 0.1, 0.2, 0.3, 0.4, 0.5]
    )
    files = Timeline(nominal_dt=0.1)
    assert [files.map(t) for t in (0.0, 30.0)] == [0.0, 30.0]  # a file's gap is real


def test_backoff() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.25, max_attempts=5)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        assert base * 0.75 <= backoff.delay(attempt) <= base * 1.25
    assert not backoff.exhausted(5) and backoff.exhausted(6)
    assert not Backoff().exhausted(10**6)


def test_skip_nonref_decodes_less_and_keeps_every_timestamp_true(cfr: Clip) -> None:
    """Each sampled picture (its barcode) sits at the pts reported for it; samples stay one per
    tick, at most two frames late (the clip has 2 B-frames between references)."""
    clip = cfr
    with open_source(clip.path, fps=4.0, skip_nonref=True) as src:
        frames = list(src)
        decoded = src.stats.decoded
    everything = read_all(clip.path, fps=4.0)
    assert decoded < len(clip.times)  # B-frames were skipped
    indices = [decode_index(f.image) for f in frames]
    assert [f.pts for f in frames] == pytest.approx([clip.times[i] for i in indices], abs=2e-3)
    assert_well_formed(frames)
    exact = reference_sample(clip.times, 4.0)
    assert len(frames) == len(everything) == len(exact)
    assert all(0 <= i - j <= 2 for i, j in zip(indices, exact))


def test_skip_nonref_leaves_fast_sampling_alone(cfr: Clip) -> None:
    """Sampling near the frame rate needs every frame: nothing is skipped."""
    with open_source(cfr.path, fps=30.0, skip_nonref=True) as src:
        frames = list(src)
    assert [decode_index(f.image) for f in frames] == list(range(300))
