"""A model worker that stays unreachable for `worker_failover_s` hands its streams to another
worker, caused for real: its OS process is frozen (SIGSTOP), so it is alive to the OS and to
Ray but answers nothing, as a worker behind a dead node's network does."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from connectors.client import SlowFastClient
from tests.support.background_run import BackgroundRun, wait_until
from tests.support.media import cfr_times, make_clip
from tests.test_pipeline_e2e import clip, pipeline_config  # noqa: F401 - clip: a fixture

# Longer than the driver's health-check timeout (5 s), the first sign of an unreachable worker:
# a move before FAILOVER_S is then a move that did not wait for it.
FAILOVER_S = 10.0


@pytest.mark.slow(seconds=45)
def test_streams_of_a_worker_unreachable_for_worker_failover_s_move_to_another(
    ray_session, redis_url, tiny_model_dir, tmp_path, clip
):
    """Two workers: the file's worker is frozen mid-file. Once it has not answered for
    `worker_failover_s`, the file moves to the other worker, which captions the rest, every
    window exactly once; the camera already there goes on. The frozen worker, woken at the end,
    writes nothing twice."""
    import ray

    long_clip = make_clip(tmp_path / "long.mp4", cfr_times(8, 20.0)).path  # 80 frames -> 19 windows
    streams = [{"id": "long", "source": str(long_clip)}, {"id": "cam", "source": f"loop://{clip}", "live": True}]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams, file_windows_in_flight=1,
                             workers=2, worker_cpus=0.5, ingest_cpus=0.25, worker_failover_s=FAILOVER_S)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)

    def captioned(stream: str) -> list[int]:
        return [c.window for c in client.history(stream, count=1000)]

    frozen_pid = None
    try:
        wait_until(lambda: len(captioned("long")) >= 3, timeout=180)  # Ray and both models start first
        worker = ray.get_actor("worker:0")
        assert set(ray.get(worker.stats.remote())) == {"long"}  # the least loaded at start took the file
        frozen_pid = ray.get(worker.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(frozen_pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_until(lambda: any(" moved from model worker 0" in e for e in run.events), timeout=120)
        assert time.monotonic() - frozen_at >= FAILOVER_S  # not before it was unreachable that long
        wait_until(lambda: len(captioned("long")) >= 19, timeout=120)
        cam_windows = len(captioned("cam"))
        wait_until(lambda: len(captioned("cam")) > cam_windows)  # the camera never stopped
    finally:
        if frozen_pid is not None:  # it answers again (a network that heals); its old windows are duplicates
            os.kill(frozen_pid, signal.SIGCONT)
        run.finish()
    moves = [e for e in run.events if " moved from model worker" in e]
    assert moves == [f"stream long moved from model worker 0 (unreachable for {FAILOVER_S:.0f} s) to worker 1"], moves
    assert captioned("long") == list(range(19))
    lines = (tmp_path / "long" / "captions.jsonl").read_text().splitlines()
    assert [(json.loads(line)["window"], json.loads(line).get("error")) for line in lines] == [
        (w, None) for w in range(19)]  # each exactly once, none failed
