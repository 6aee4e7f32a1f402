"""Starting a file part-way (a segment of a split file): the frames sampled after a seek are
exactly a single pass's, numbered as it numbers them, on several codecs and containers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from connectors.sources import PLAN_MISMATCH, SourceError, open_source, scan_samples
from tests.support.media import Clip, cfr_times, make_clip, reference_sample

SMALL = 64
VFR_TIMES = [i / 30 for i in range(60)] + [2 + i / 5 for i in range(10)] + [7 + i / 12 for i in range(24)] + \
    [9 + i / 25 for i in range(200)]  # 30 fps, 5 fps, a 3 s gap, 12 fps, then 25 fps


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Clip]:
    folder = tmp_path_factory.mktemp("seek")
    return {
        "h264 mp4, B-frames": make_clip(folder / "h264.mp4", cfr_times(30, 20)),
        "vp9 webm": make_clip(folder / "vp9.webm", cfr_times(30, 12), codec="libvpx-vp9",
                              options={"deadline": "realtime", "cpu-used": "8", "g": "40"}),
        "hevc mkv, open GOP": make_clip(folder / "hevc.mkv", cfr_times(25, 12), codec="libx265",
                                        options={"preset": "ultrafast", "x265-params": "keyint=30:bframes=3:log-level=error"}),
        "variable frame rate mkv": make_clip(folder / "vfr.mkv", VFR_TIMES, options={"preset": "veryfast", "bf": "0", "g": "30"}),
    }


def sampled(path: Path, **options):
    with open_source(path, size=SMALL, **options) as source:
        frames = list(source)
        return frames, source.stats.decoded


@pytest.mark.parametrize("name", ["h264 mp4, B-frames", "vp9 webm", "hevc mkv, open GOP", "variable frame rate mkv"])
@pytest.mark.parametrize("fps", [4.0, 7.5])
@pytest.mark.parametrize("skip_nonref", [False, True])
def test_a_seek_gives_the_single_pass_frames_from_there_on(clips, name, fps, skip_nonref):
    clip = clips[name]
    plan = scan_samples(str(clip.path), fps)
    whole, decoded_whole = sampled(clip.path, fps=fps, skip_nonref=skip_nonref)
    assert plan.frames == len(whole) == len(reference_sample(clip.times, fps))
    for first in [1, plan.frames // 3, plan.frames // 2 + 1, plan.frames - 1]:
        part, decoded = sampled(clip.path, fps=fps, skip_nonref=skip_nonref, plan=plan, first_frame=first)
        assert [(f.seq, f.pts) for f in part] == [(f.seq, f.pts) for f in whole[first:]]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(part, whole[first:]))  # the same pictures
        if first > plan.frames // 2:
            assert decoded < decoded_whole  # it sought: the start of the file was not decoded


def test_a_scan_that_cannot_number_the_file_is_refused_frame_by_frame(tmp_path):
    """Six B-frames between references at 30 fps, sampled at 7.5 fps with skip_nonref: some
    ticks hold B-frames only, so the single pass samples fewer frames than the packets say.
    Starting part-way must not silently renumber: it fails, naming the mismatch."""
    clip = make_clip(tmp_path / "bframes.mp4", cfr_times(30, 12),
                     options={"preset": "veryfast", "bf": "6", "b-pyramid": "none", "g": "60", "b_strategy": "0"})
    plan = scan_samples(str(clip.path), 7.5)
    whole, _ = sampled(clip.path, fps=7.5, skip_nonref=True)
    assert len(whole) < plan.frames  # the packet scan is wrong for this decode
    with pytest.raises(SourceError, match=PLAN_MISMATCH):
        sampled(clip.path, fps=7.5, skip_nonref=True, plan=plan, first_frame=plan.frames // 2)
    exact, _ = sampled(clip.path, fps=7.5, skip_nonref=False, plan=plan, first_frame=plan.frames // 2)
    assert [f.seq for f in exact] == list(range(plan.frames // 2, plan.frames))  # decoding every frame, it holds


def test_what_a_scan_cannot_plan(tmp_path, clips):
    assert scan_samples(f"loop://{clips['vp9 webm'].path}", 4.0) is None  # not a file read once
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(b"\x00" * 1000)
    assert scan_samples(str(damaged), 4.0) is None  # read in one pass, which reports the damage
    plan = scan_samples(str(clips["vp9 webm"].path), 4.0)
    for bad in [{"first_frame": plan.frames}, {"fps": 2.0}, {"live": True}]:
        with pytest.raises(SourceError):
            open_source(clips["vp9 webm"].path, **({"fps": 4.0, "plan": plan, "first_frame": 1} | bad))
