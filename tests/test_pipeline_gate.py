"""The scene gate and event lifecycle end to end (real RTSP server, Ray, Redis, the shipped
world model): 144 s of a static noisy scene with two 8-second visits of a red circle, captioned
live at 4 fps, window 16, stride 8 (the gate bench counts 14 of its 71 windows to the model)."""

from __future__ import annotations

import pytest

from connectors.client import SlowFastClient
from connectors.redis_schema import EventPhase
from pipeline.config import load_config
from tests.support.background_run import BackgroundRun, wait_until
from bench.gate_bench import SCENE_S, visit_clip, visits_for
from world.scenes import parse_caption

CLIP_S = 144.0
VISITS = visits_for(CLIP_S)  # two 8-second visits


@pytest.mark.slow(seconds=175)
@pytest.mark.timeout(600)
def test_a_gated_camera_runs_the_model_on_a_quarter_of_its_windows_and_misses_no_visit(
    ray_session, redis_url, tmp_path, rtsp_server_factory
):
    server = rtsp_server_factory(visit_clip(tmp_path / "visits.mp4", CLIP_S)).start()
    question = {"id": "red-circle", "prompt": "Is there a red circle?", "answer": "probability",
                "trigger": {"p_yes_above": 0.5}}
    config = load_config(None, redis_url=redis_url, out_dir=tmp_path / "out", window=16, stride=8, fps=4.0,
                         streams=[{"id": "yard", "source": server.url(), "live": True,
                                   "standing_questions": [question]}])
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: (c := client.latest("yard")) is not None and c.end >= CLIP_S - 2 * SCENE_S, timeout=420)
    finally:
        summary = run.finish()["yard"]
    status = client.status("yard")
    captions = client.history("yard", count=1000)
    model_windows = status.windows_done - status.windows_gated
    print(f"windows {status.windows_emitted}, to the model {model_windows}, gated {status.windows_gated}, "
          f"frames in {summary.frames_in}, encoded {summary.stats.frames_encoded}")
    # Without the gate every window goes to the model.
    assert model_windows <= 0.25 * status.windows_emitted
    assert summary.stats.frames_encoded <= 0.45 * summary.frames_in

    records = client.events("yard")
    for start, end in VISITS:
        during = [c for c in captions if c.start >= start and c.end <= end]
        assert during and all(("red", "circle") in {(o, s) for o, s, _ in parse_caption(c.text)} for c in during), \
            [(c.window, c.start, c.unchanged_since_window, c.text) for c in during]
        opened = [e for e in records if e.phase == EventPhase.OPENED and start - 4 <= e.start < end]
        assert len(opened) == 1, [(e.window, e.phase, e.start) for e in records]
        closed = [e for e in records if e.event_id == opened[0].event_id and e.phase == EventPhase.CLOSED]
        assert len(closed) == 1 and closed[0].start >= end - 4
    assert len([e for e in records if e.phase == EventPhase.OPENED]) == len(VISITS)
    assert client.open_events("yard") == []
