"""Redis SIGKILLed mid-run and restarted on the same port, with and without persistence, while a
live camera (loop://) and a file run. Real Redis, real Ray, the tiny model."""

from __future__ import annotations

import json
import threading
import time

import pytest

from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.redis_conn import connect
from connectors.redis_schema import QUESTION_GROUP, Caption, Keys, decode_entry
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.window import expected_windows
from tests.support.media import cfr_times, make_clip

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
