"""Redis SIGKILLed mid-run and restarted on the same port, with and without persistence, while a
live camera (loop://) and a file run. Real Redis, real Ray, the tiny model."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import pytest
import ray

from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.redis_conn import connect
from connectors.redis_schema import QUESTION_GROUP, Answer, Caption, Keys, Question, decode_entry, encode_entry
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.running import DRAIN_FLUSH_S
from pipeline.window import expected_windows
from tests.support.background_run import BackgroundRun
from tests.support.media import cfr_times, make_clip
from tests.support.model_faults import HoldWhileFileExists, worker_with

K = Keys()
WINDOW, STRIDE, FPS = 8, 4, 4.0
OUTAGE_S = 10.0
FILE_SECONDS = 60.0  # long enough that the file is still being captioned during the outage


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restart-clips")
    return (make_clip(folder / "cam.mp4", cfr_times(8, 10.0)).path,
            make_clip(folder / "file.mp4", cfr_times(8, FILE_SECONDS)).path)


def wait_until(predicate, timeout: float = 120.0, what: str = "condition") -> float:
    """Seconds it took until `predicate()` held."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what} not seen within {timeout:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - start


def captions_in(r, sid: str) -> list[Caption]:
    return [decode_entry(Caption, fields) for _, fields in r.xrange(K.captions(sid))]


@pytest.mark.slow(seconds=130)
@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_run_survives_redis_killed_and_restarted(persistent, ray_session, tiny_model_dir, tmp_path, clips):
    cam_clip, file_clip = clips
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
    with EmbeddedRedis(extra_args=persistence) as server:
        r = connect(server.url)
        config = load_config(
            None, redis_url=server.url, model=str(tiny_model_dir), out_dir=tmp_path, window=WINDOW, stride=STRIDE,
            fps=FPS, generation={"max_new_tokens": 4},
            streams=[{"id": "cam", "source": f"loop://{cam_clip}", "live": True},
                     {"id": "file", "source": str(file_clip)}],
        )
        stop, events, printed, result = threading.Event(), [], [], {}
        run = threading.Thread(target=lambda: result.update(
            run_pipeline(config, stop=stop, on_event=events.append, on_caption=printed.append)))
        run.start()
        try:
            wait_until(lambda: r.xlen(K.captions("file")) > 0 and r.xlen(K.captions("cam")) > 0,
                       what="first captions")
            killed_at = time.time()
            server.kill()
            server.stop()
            time.sleep(OUTAGE_S)
            server.start()
            restarted_at = time.time()

            # Registry, statuses and the question group are back within seconds, persistence or not.
            restored_s = wait_until(
                lambda: {"cam", "file"} <= set(r.hkeys(K.registry))
                and r.exists(K.status("cam")) and r.exists(K.status("file")), timeout=30, what="registry/status")
            client = SlowFastClient(server.url)
            answer = client.ask("cam", "Is anyone there?", timeout=120)
            assert answer.ok and answer.window is not None
            assert QUESTION_GROUP in [g["name"] for g in r.xinfo_groups(K.questions)]
            wait_until(lambda: any(c.created_at > restarted_at for c in captions_in(r, "cam")), what="new cam caption")
            wait_until(lambda: client.status("file") is not None and client.status("file").state == "ended",
                       timeout=300, what="file ended")
        finally:
            stop.set()
            run.join(timeout=180)
        assert not run.is_alive()

        expected = expected_windows(round(FILE_SECONDS * FPS), WINDOW, STRIDE)
        jsonl = [json.loads(line)["window"] for line in (tmp_path / "file" / "captions.jsonl").read_text().splitlines()]
        assert jsonl == list(range(expected))
        assert result["file"].state == "ended" and result["file"].stats.windows_done == expected
        assert result["cam"].state == "stopped"
        file_captions = captions_in(r, "file")
        # The premise: file windows were captioned while Redis was down, and reached it afterwards.
        assert any(killed_at < c.created_at < restarted_at for c in file_captions)
        if persistent:  # nothing lost, nothing twice
            assert [c.window for c in file_captions] == jsonl
        else:  # what the restart wiped is gone; everything captioned from the outage on is there, once
            windows = [c.window for c in file_captions]
            assert windows == list(range(windows[0], expected))
        for sid in ("cam", "file"):  # the caption printer: in order, none twice, resumed after the outage
            shown = [c.window for c in printed if c.stream == sid]
            assert shown == sorted(set(shown)) and max(shown) > 0
        shown_file = [c.window for c in printed if c.stream == "file"]
        assert shown_file == list(range(shown_file[0], expected))  # every window from its first on
        assert [e for e in events if e.startswith("redis unreachable")][:1] and \
            len([e for e in events if e.startswith("redis unreachable")]) == 1, events
        print(f"\nRedis down {restarted_at - killed_at:.1f} s; registry and status back {restored_s:.1f} s after "
              f"the restart; file windows {len(file_captions)} in Redis / {len(jsonl)} in JSONL / {expected} expected")


def held_on_its_first_batch() -> bool:
    """Frames encoded and no window done: the worker is inside its first model call, which
    the gate holds."""
    try:
        stats = ray.get(ray.get_actor("worker:0").stats.remote())["cam"]
    except (ValueError, KeyError):  # not started yet
        return False
    return stats.frames_encoded > 0 and stats.windows_done == 0


def first_reply(r, key: str, timeout: float) -> str | None:
    """BLPOP in short blocks (a long one would outlast the socket timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popped := r.blpop([key], timeout=1):
            return popped[1]
    return None


@pytest.mark.slow(seconds=40)
def test_a_question_answered_during_an_outage_is_replied_after_it_and_a_stop_during_one_waits_a_bounded_time(
    ray_session, tiny_model_dir, tmp_path, clips, caplog
):
    """The model is held on a camera's first batch while a question reaches the model worker, so
    its answer cannot exist before Redis is SIGKILLed; the model is let go during the outage, and
    the driver queues the answer's reply and fails to write it. Redis comes back with its data:
    the asker gets its one reply. Then Redis goes down again and
    the run is stopped: the workers wait DRAIN_FLUSH_S for it, the run ends, and the log counts
    the writes that never arrived."""
    cam_clip, _ = clips
    gate = tmp_path / "hold"
    gate.touch()
    with EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server, \
            caplog.at_level(logging.WARNING, logger="slowfast.pipeline"):
        r = connect(server.url)
        config = load_config(
            None, redis_url=server.url, model=str(tiny_model_dir), out_dir=tmp_path, window=WINDOW, stride=STRIDE,
            fps=FPS, generation={"max_new_tokens": 4},
            streams=[{"id": "cam", "source": f"loop://{cam_clip}", "live": True}],
        )
        run = BackgroundRun(config, worker_class=worker_with(HoldWhileFileExists(gate)))
        try:
            wait_until(held_on_its_first_batch, timeout=180, what="the model held on a batch")
            asked = r.xadd(K.questions, encode_entry(Question(stream="cam", text="Is anyone there?")))
            # At the worker, waiting to ride the next window (one always waits while the model is held).
            riders = lambda: ray.get(ray.get_actor("worker:0").__ray_call__.remote(  # noqa: E731
                lambda worker: len(worker.engine.riders.get("cam", []))))
            wait_until(lambda: riders() == 1, timeout=120, what="the question at the model worker")
            assert not r.exists(K.done(asked))  # the model is held: no answer can exist yet

            server.kill()
            server.stop()
            gate.unlink()
            windows_done = lambda: ray.get(ray.get_actor("worker:0").stats.remote())["cam"].windows_done  # noqa: E731
            wait_until(lambda: windows_done() >= 3, timeout=120, what="windows captioned during the outage")
            time.sleep(8)  # the driver's next tries (5 s apart at most) queue the answer's reply and fail to send it
            offered = ray.get(ray.get_actor("worker:0").__ray_call__.remote(
                lambda worker: worker.engine.scheduler.lanes["cam"].next_seq))  # windows so far: 0 .. offered-1
            server.start()

            reply = first_reply(r, K.reply(asked), timeout=120)
            assert reply is not None, f"no answer after the outage; events: {run.events[-10:]}"
            answer = Answer.model_validate_json(reply)
            # The answer from the outage, not one the intake's reclaim (a minute on) had asked again.
            assert answer.ok and answer.window is not None and answer.window < offered, (answer, offered, run.events)
            wait_until(lambda: int(r.xpending(K.questions, QUESTION_GROUP)["pending"]) == 0, timeout=120,
                       what="the question acknowledged")
            assert r.llen(K.reply(asked)) == 0  # one reply, none behind it

            # Redis down at the stop: the workers' final statuses, at least, are buffered.
            server.kill()
            server.stop()
            stopped_at = time.monotonic()
            result = run.finish(timeout=DRAIN_FLUSH_S + 60)  # fails the test if the drain hangs
            took = time.monotonic() - stopped_at
        finally:
            gate.unlink(missing_ok=True)
            run.finish(timeout=180)
            r.close()
    assert result["cam"].state == "stopped", result
    assert took >= DRAIN_FLUSH_S, took  # the workers did wait for Redis
    lost = [int(m[1]) for record in caplog.records
            if (m := re.match(r"(\d+) writes never reached Redis \(unreachable at the stop\)", record.getMessage()))]
    assert len(lost) == 1 and lost[0] >= 1, [record.getMessage() for record in caplog.records]
    print(f"\nstop with Redis down took {took:.1f} s; {lost[0]} writes never reached Redis")
