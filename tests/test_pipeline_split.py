"""A long file split over two model workers (real Ray, Redis, PyAV clips, the tiny model): the
captions in Redis, JSONL and WebVTT and the standing answers equal a single worker's window
for window, both workers take part, and a worker or ingest actor killed mid-segment, or the
driver killed outright, loses no window and writes none twice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from connectors.client import SlowFastClient
from connectors.redis_schema import SummaryKind
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.segments import plan_segments
from pipeline.window import expected_windows
from tests.support.background_run import BackgroundRun, killed_mid_file
from tests.support.media import cfr_times, make_clip, read_vtt_cues

# One worker under xdist: the single-worker run every test compares with is a module fixture.
pytestmark = pytest.mark.xdist_group("split")

# 1 fps keeps the model's tower cheap on CPU; windows of 6 at stride 3 keep a pre-roll of 3 frames.
WINDOW, STRIDE, FPS = 6, 3, 1.0
SECONDS = 90
TOTAL = expected_windows(round(SECONDS * FPS), WINDOW, STRIDE)  # 29 windows: 3 segments for 2 workers
TWO_WORKERS = {"workers": 2, "worker_cpus": 0.5, "ingest_cpus": 0.25}
QUESTION = {"id": "circle", "prompt": "Is there a red circle?", "answer": "probability"}


@pytest.fixture(scope="module")
def film(tmp_path_factory) -> Path:
    """90 s at 16 fps with B-frames (keyframes every 30 frames): skip_nonref decoding is on."""
    return make_clip(tmp_path_factory.mktemp("split") / "film.mp4", cfr_times(16, SECONDS)).path


def config_for(redis_url, model_dir, out_dir, film, **extra):
    return load_config(
        None, redis_url=redis_url, model=str(model_dir), out_dir=out_dir, window=WINDOW, stride=STRIDE, fps=FPS,
        streams=[{"id": "film", "source": str(film), "summary_every_n_windows": 10, "standing_questions": [QUESTION]}],
        generation={"max_new_tokens": 6}, **extra,
    )


def outputs(redis_url, out_dir: Path) -> dict:
    """What consumers see of the file: captions in Redis, the standing answers, JSONL lines and
    the VTT (times, text, order)."""
    client = SlowFastClient(redis_url)
    lines = [json.loads(line) for line in (out_dir / "film" / "captions.jsonl").read_text().splitlines()]
    return {
        "redis": [(c.window, c.start, c.end, c.text, c.error) for c in client.history("film", count=1000)],
        "answers": [(a.window, a.start, a.end, a.text, round(a.probability, 5)) for a in client.answers("film", count=1000)],
        "jsonl": [(r["window"], r["start"], r["end"], r["caption"], r.get("error")) for r in lines],
        "vtt": (out_dir / "film" / "captions.vtt").read_text(),
    }


@pytest.fixture(scope="module")
def single_worker(ray_session, redis_server, tiny_model_dir, film, tmp_path_factory) -> dict:
    """The reference: the file on one model worker, as ever."""
    out = tmp_path_factory.mktemp("single")
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/0"  # a database of its own (tests cycle through 1-15)
    with SlowFastClient(redis_url) as client:
        client.redis.flushdb()
    events: list[str] = []
    result = run_pipeline(config_for(redis_url, tiny_model_dir, out, film, workers=1, worker_cpus=0.5),
                          on_event=events.append)
    assert result["film"].state == "ended" and not any("split" in e for e in events), events
    reference = outputs(redis_url, out)
    assert [w for w, *_ in reference["redis"]] == list(range(TOTAL))
    assert len({text for _, _, _, text, _ in reference["redis"]}) > 1  # the captions tell windows apart
    return reference


class LanesSeen:
    """Which model workers hold segment lanes of the file while it runs (and how far each got;
    `readded`: lanes whose count started over at a worker, which lost them in a restart)."""

    def __init__(self):
        self.done: dict[int, dict[str, int]] = {0: {}, 1: {}}
        self.readded: set[tuple[int, str]] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        import ray

        while not self.stop.is_set():
            for index, lanes in self.done.items():
                try:
                    stats = ray.get(ray.get_actor(f"worker:{index}").stats.remote(), timeout=5)
                except Exception:  # not started yet, restarting, or gone
                    continue
                for lane, counts in stats.items():
                    if lane.startswith("film~"):
                        if counts.windows_done < lanes.get(lane, 0):
                            self.readded.add((index, lane))
                        lanes[lane] = max(lanes.get(lane, 0), counts.windows_done)
            time.sleep(0.2)

    def wait_for(self, worker: int, windows: int, timeout: float = 600) -> None:
        """Until a lane of `worker` has `windows` windows done: it is mid-segment."""
        deadline = time.time() + timeout
        while time.time() < deadline and not any(n >= windows for n in self.done[worker].values()):
            time.sleep(0.2)
        assert any(n >= windows for n in self.done[worker].values()), self.done

    def finish(self) -> dict[int, dict[str, int]]:
        self.stop.set()
        self.thread.join()
        return self.done


def check_rolling_and_final_summaries(redis_url) -> None:
    summaries = SlowFastClient(redis_url).summaries("film", count=100)
    rolling = [s for s in summaries if s.kind == SummaryKind.ROLLING]
    assert [w for s in rolling for w in range(s.first_window, s.last_window + 1)] == list(range(TOTAL))
    final = summaries[-1]
    assert (final.kind, final.first_window, final.last_window) == (SummaryKind.FINAL, 0, TOTAL - 1)


@pytest.mark.slow(seconds=135)
@pytest.mark.timeout(1200)  # with the single-worker run it compares with
def test_two_workers_give_the_single_workers_captions_window_for_window(
    ray_session, redis_url, tiny_model_dir, film, single_worker, tmp_path
):
    lanes = LanesSeen()
    try:
        run = BackgroundRun(config_for(redis_url, tiny_model_dir, tmp_path, film, **TWO_WORKERS))
        result = run.finish(stop=False, timeout=600)
    finally:
        seen = lanes.finish()
    assert any("stream film split into 3 segments of about 10 windows over 2 model workers" in e
               for e in run.events), run.events
    assert result["film"].state == "ended" and result["film"].stats.windows_done == TOTAL
    assert seen[0] and seen[1] and len(seen[0] | seen[1]) == 3  # both workers took part, in 3 segments
    assert outputs(redis_url, tmp_path) == single_worker  # Redis, answers, JSONL, VTT: text, times, order
    assert len(read_vtt_cues(tmp_path / "film" / "captions.vtt")) == TOTAL  # FFmpeg reads the VTT back
    check_rolling_and_final_summaries(redis_url)
    status = SlowFastClient(redis_url).status("film")
    assert (status.state, status.windows_done, status.windows_total, status.windows_emitted) == \
        ("ended", TOTAL, TOTAL, TOTAL)
    assert status.frames_in == SECONDS * FPS  # a pre-roll's frames are sampled twice, counted once
    # the overlapping frames were encoded twice (once per segment), the rest once
    assert result["film"].stats.frames_encoded == SECONDS * FPS + 2 * (WINDOW - STRIDE)


@pytest.mark.slow(seconds=90)
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("fault", ["worker restarted", "worker gone, segment ingest restarted"])
def test_a_worker_or_ingest_killed_mid_segment_loses_no_window(
    ray_session, redis_url, tiny_model_dir, film, single_worker, tmp_path, fault
):
    import ray

    lanes = LanesSeen()
    try:
        # Restarted: a failover far longer than a restart, so the worker always gets its lane
        # back however slow its restart. Gone: its segments move within seconds.
        failover = 600.0 if fault == "worker restarted" else 5.0
        run = BackgroundRun(config_for(redis_url, tiny_model_dir, tmp_path, film, **TWO_WORKERS,
                                       worker_failover_s=failover))
        lanes.wait_for(worker=1, windows=2)
        running = set(lanes.done[1])
        if fault == "worker restarted":
            ray.kill(ray.get_actor("worker:1"), no_restart=False)  # Ray restarts it, without its lanes
        else:
            ray.kill(ray.get_actor("worker:1"), no_restart=True)  # its segment moves to worker 0
            # The moved segment's ingest: Ray restarts it (its frames are gone) with the dead worker
            # it was made for, and it must follow the move.
            ray.kill(ray.get_actor(f"ingest:{min(running)}"), no_restart=False)
        result = run.finish(stop=False, timeout=900 if fault == "worker restarted" else 300)
    finally:
        lanes.finish()
    assert result["film"].state == "ended"
    if fault == "worker restarted":  # the restarted worker got its lane back, from where the merge was
        assert any((1, lane) in lanes.readded for lane in running), (lanes.done, lanes.readded)
    else:  # the dead worker's segment moved to the other
        assert running & set(lanes.done[0]), lanes.done
    assert outputs(redis_url, tmp_path) == single_worker  # every window exactly once, as one worker gives it
    check_rolling_and_final_summaries(redis_url)




@pytest.mark.slow(seconds=130)
@pytest.mark.timeout(1500)
def test_a_split_run_killed_outright_resumes_with_only_the_missing_windows(
    redis_url, tiny_model_dir, film, single_worker, tmp_path
):
    config = tmp_path / "split.yaml"  # the stream with its question and summaries, on two workers
    config.write_text(json.dumps({**TWO_WORKERS, "streams": [{
        "id": "film", "source": str(film), "summary_every_n_windows": 10, "standing_questions": [QUESTION]}]}))
    out = tmp_path / "out"
    command = [str(Path(sys.executable).with_name("slowfast")), "run", "--config", str(config), "--redis-url", redis_url,
               "--out", str(out), "--model", str(tiny_model_dir), "--window", str(WINDOW), "--stride", str(STRIDE),
               "--fps", str(FPS), "--max-new-tokens", "6"]
    client = SlowFastClient(redis_url)
    done_before = killed_mid_file(command, client, "film", captions=5, timeout=600)
    assert 5 <= done_before < TOTAL

    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"stream film resumes after window {done_before - 1}" in second.stdout, second.stdout
    # the windows left are split again when there are enough of them for two segments
    left_split = bool(plan_segments(round(SECONDS * FPS), WINDOW, STRIDE, FPS, 20.0, 2, next_window=done_before))
    assert ("stream film split into" in second.stdout) == left_split, second.stdout
    assert outputs(redis_url, out) == single_worker  # the missing windows only, each once, in order
    check_rolling_and_final_summaries(redis_url)
