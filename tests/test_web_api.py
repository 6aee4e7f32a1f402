"""The web app's HTTP API on a real socket and a real Redis: data published through the
contract (Publisher) or by the real pipeline, questions answered through the real intake."""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from connectors.publisher import Publisher
from connectors.redis_conn import connect
from connectors.redis_schema import FRAME_MAX_SIDE, IngestState, StreamInfo, StreamStatus
from pipeline.cli import app as cli_app
from pipeline.config import load_config
from pipeline.outputs import CaptionFiles
from pipeline.pictures import window_picture
from pipeline.runner import run_pipeline
from pipeline.web.server import WebServer, serving
from tests.support.media import cfr_times, make_clip
from tests.support.records import make_caption, make_event
from tests.support.web import STANDING_QUESTION, standing_answer


def picture(seed: int, size: int = 576) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def seed_stream(redis_url: str, windows: int, sid: str = "cam1", event_windows: tuple[int, ...] = ()) -> StreamInfo:
    with Publisher(redis_url) as pub:
        info = pub.register_stream(StreamInfo(id=sid, source="rtsp://viewer:secret@10.0.0.7/stream1"))
        for w in range(windows):
            caption = make_caption(w, stream=sid, run=info.run, latency_s=0.5)
            events = [make_event(w, stream=sid, run=info.run)] if w in event_windows else []
            pub.publish_window(caption, events=events, frame=window_picture(picture(w), caption))
        pub.publish_status(StreamStatus(stream=sid, state=IngestState.LIVE, frames_in=4 * windows))
    return info


def test_streams_captions_events_and_pictures(redis_url, web_server):
    info = seed_stream(redis_url, 5, event_windows=(3,))
    api = httpx.Client(base_url=web_server.url, timeout=10)

    (summary,) = api.get("/api/streams").json()
    assert summary["id"] == "cam1" and summary["state"] == "live"
    assert summary["source"] == "rtsp://viewer:***@10.0.0.7/stream1"  # credentials never shown
    assert summary["caption"]["window"] == 4 and summary["frame"]["window"] == 4
    assert [e["window"] for e in summary["events"]] == [3]  # the last hour's events

    # Captions newest first, paged back with `before` and forward with `after`.
    first = api.get("/api/streams/cam1/captions", params={"count": 2}).json()
    assert [c["window"] for c in first] == [4, 3]
    older = api.get("/api/streams/cam1/captions", params={"count": 2, "before": first[-1]["entry_id"]}).json()
    assert [c["window"] for c in older] == [2, 1]
    newer = api.get("/api/streams/cam1/captions", params={"after": older[-1]["entry_id"]}).json()
    assert [c["window"] for c in newer] == [4, 3, 2]

    # The latest frame is the last window's picture; the event keeps its own window's.
    frame = api.get("/api/streams/cam1/frame.jpg")
    assert frame.headers["content-type"] == "image/jpeg" and frame.headers["x-window"] == "4"
    assert Image.open(io.BytesIO(frame.content)).size == (FRAME_MAX_SIDE, FRAME_MAX_SIDE)
    (event,) = api.get("/api/streams/cam1/events").json()
    assert event["snapshot_id"] == make_caption(3, run=info.run).entry_id
    snapshot = api.get(event["snapshot_url"])
    assert snapshot.content == window_picture(picture(3), make_caption(3, run=info.run))[1]
    assert snapshot.content != frame.content

    assert api.get("/api/streams/nope").status_code == 404
    assert api.get("/api/streams/nope/frame.jpg").status_code == 404
    assert api.get("/api/streams/bad%20id").status_code == 422
    assert api.get("/openapi.json").json()["paths"]["/api/streams/{stream}/captions"]


def test_downloads_are_the_pipeline_files_built_from_redis(redis_url, web_server, tmp_path):
    info = seed_stream(redis_url, 4)
    api = httpx.Client(base_url=web_server.url, timeout=10)
    jsonl = api.get("/api/streams/cam1/captions.jsonl")
    vtt = api.get("/api/streams/cam1/captions.vtt")
    assert "attachment" in jsonl.headers["content-disposition"]
    files = CaptionFiles(tmp_path, 0.25)  # what the pipeline writes for a file stream
    for w in range(4):
        files.write(make_caption(w, run=info.run, latency_s=0.5))
    files.close()
    assert jsonl.text == files.jsonl_path.read_text()
    assert vtt.text == files.vtt_path.read_text()
    assert [json.loads(line)["window"] for line in jsonl.text.splitlines()] == [0, 1, 2, 3]


def test_questions_go_through_the_intake_to_the_pipeline(redis_url, web_server, answering_pipeline):
    """The running pipeline answers; a stream that is registered but not running gets its
    error reply."""
    sid = answering_pipeline
    seed_stream(redis_url, 1, sid="gone")  # registered by an earlier run, not running now
    api = httpx.Client(base_url=web_server.url, timeout=120)
    ok = api.post(f"/api/streams/{sid}/questions",
                  json={"text": STANDING_QUESTION["prompt"], "kind": "yesno", "timeout_s": 60})
    assert ok.status_code == 200, ok.text
    answer = ok.json()
    standing = standing_answer(redis_url, answer["window"])  # the same question on the same window
    assert answer["stream"] == sid and answer["kind"] == "adhoc" and answer["question"] == STANDING_QUESTION["prompt"]
    assert (answer["start"], answer["end"], answer["text"]) == (standing.start, standing.end, standing.text)
    assert answer["probability"] == pytest.approx(standing.probability, abs=1e-4)

    failed = api.post("/api/streams/gone/questions", json={"text": "anyone?", "timeout_s": 60})
    assert failed.status_code == 422 and failed.json()["detail"] == "stream 'gone' is not running"

    too_long = api.post(f"/api/streams/{sid}/questions", json={"text": "x" * 2001})
    assert too_long.status_code == 422 and "2000" in too_long.text
    assert api.post(f"/api/streams/{sid}/questions", json={"text": ""}).status_code == 422
    assert api.post("/api/streams/nope/questions", json={"text": "hi"}).status_code == 404
    # A form post from another site (no JSON content type) is not a question.
    assert api.post(f"/api/streams/{sid}/questions", content="text=hi",
                    headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 422


def test_no_pipeline_answering_is_a_timeout_reply(redis_url, web_server):
    seed_stream(redis_url, 1)
    api = httpx.Client(base_url=web_server.url, timeout=30)
    resp = api.post("/api/streams/cam1/questions", json={"text": "anyone?", "timeout_s": 0.5})
    assert resp.status_code == 504 and "no answer within 0.5 s" in resp.json()["detail"]


def test_token_required_off_loopback_and_host_checked_on_it(redis_url, web_server):
    seed_stream(redis_url, 1)
    # Loopback: no token, but only requests addressed to a loopback name (DNS rebinding).
    assert httpx.get(web_server.url + "api/streams").status_code == 200
    assert httpx.get(web_server.url + "api/streams", headers={"host": "evil.example"}).status_code == 400

    with pytest.raises(ValueError, match="needs a token"):
        WebServer(redis_url, "0.0.0.0", 0)
    server = WebServer(redis_url, "0.0.0.0", 0, token="s3cret").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/api/streams").status_code == 401
        assert httpx.get(base + "/api/streams", headers={"x-slowfast-token": "wrong"}).status_code == 401
        assert httpx.get(base + "/api/streams", headers={"authorization": "Bearer s3cret"}).status_code == 200
        page = httpx.get(base + "/streams/cam1")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/streams/cam1"
        bad = httpx.post(base + "/login", data={"token": "nope", "next": "/"})
        assert bad.status_code == 303 and "failed=1" in bad.headers["location"] and "set-cookie" not in bad.headers
        good = httpx.post(base + "/login", data={"token": "s3cret", "next": "https://evil.example/"})
        assert good.headers["location"] == "/"  # never redirects off the site
        assert "httponly" in good.headers["set-cookie"].lower() and "samesite=strict" in good.headers["set-cookie"].lower()
        assert httpx.get(base + "/api/streams", cookies=good.cookies).status_code == 200
        assert "access-control-allow-origin" not in httpx.get(
            base + "/api/streams", headers={"origin": "https://evil.example", "x-slowfast-token": "s3cret"}).headers
    finally:
        server.stop()

    result = CliRunner().invoke(cli_app, ["web", "--redis-url", redis_url, "--host", "0.0.0.0"], env={"SLOWFAST_WEB_TOKEN": ""})
    assert result.exit_code == 2 and "needs a token" in result.output and "Traceback" not in result.output


def test_events_command_follows_events(redis_url):
    info = seed_stream(redis_url, 2, event_windows=(1,))
    r = connect(redis_url)
    def pattern_subscribers() -> set[int]:
        return {c["id"] for c in r.client_list() if int(c.get("psub", 0)) > 0}

    subscribed_before = pattern_subscribers()  # whatever other tests left subscribed (they may leave)
    slowfast = str(Path(sys.executable).parent / "slowfast")
    proc = subprocess.Popen([slowfast, "events", "--redis-url", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True).start()
    try:
        assert "cam1 #1" in lines.get(timeout=120)  # the past event first
        # subscribed: a nudge published before that is only pushed, not stored
        deadline = time.monotonic() + 120
        while not pattern_subscribers() - subscribed_before:
            assert time.monotonic() < deadline, "slowfast events never subscribed to the nudges"
            time.sleep(0.05)
        with Publisher(redis_url) as pub:
            caption = make_caption(2, run=info.run)
            pub.publish_window(caption, events=[make_event(2, run=info.run, text="Yes, a <b>van</b>")])
        line = lines.get(timeout=120)
        assert "cam1 #2" in line and "anyone? -> Yes, a <b>van</b>" in line and "P(yes)=0.90" in line
        seed_stream(redis_url, 1, sid="cam2", event_windows=(0,))  # a stream that appears later
        assert "cam2 #0" in lines.get(timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_real_pipeline_publishes_pictures_the_page_serves(ray_session, redis_url, tiny_model_dir, tmp_path):
    clip = make_clip(tmp_path / "yard.mp4", cfr_times(8, 4.0)).path
    config = load_config(None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path / "out", window=8,
                         stride=4, fps=4.0, streams=[{"id": "yard", "source": str(clip)}],
                         generation={"max_new_tokens": 4})
    run_pipeline(config, beside=lambda url: serving(url, "127.0.0.1:0"))
    server = WebServer(redis_url, "127.0.0.1", 0).start()
    try:
        api = httpx.Client(base_url=server.url, timeout=10)
        summary = api.get("/api/streams/yard").json()
        assert summary["state"] == "ended" and summary["frame"]["window"] == summary["caption"]["window"]
        jpeg = Image.open(io.BytesIO(api.get("/api/streams/yard/frame.jpg").content))
        assert jpeg.format == "JPEG" and jpeg.size == (576, 576)
        # The downloads equal the files the pipeline itself wrote.
        for name in ("captions.jsonl", "captions.vtt"):
            assert api.get(f"/api/streams/yard/{name}").text == (tmp_path / "out" / "yard" / name).read_text()
    finally:
        server.stop()


def test_vtt_download_ends_cues_at_the_streams_own_fps(redis_url, web_server, tmp_path):
    """A cue ends one frame after its window, a frame at the stream's fps (2 here, not the default)."""
    fps = 2.0
    with Publisher(redis_url) as pub:
        info = pub.register_stream(StreamInfo(id="clip", source="/data/clip.mp4", live=False,
                                              window_settings={"window": 8, "stride": 8, "fps": fps}))
        captions = [make_caption(w, stream="clip", run=info.run) for w in range(3)]
        for caption in captions:
            pub.publish_window(caption)
    files = CaptionFiles(tmp_path, 1.0 / fps)  # what the pipeline itself writes at that fps
    for caption in captions:
        files.write(caption)
    files.close()
    vtt = httpx.get(web_server.url + "api/streams/clip/captions.vtt")
    assert vtt.status_code == 200 and vtt.text == files.vtt_path.read_text()


def test_redis_down_is_a_clear_503_and_the_page_recovers(tmp_path):
    """Every route with the Redis stopped: the API answers 503 with one line, the pages still load,
    and the update stream opens, says Redis is down, and sends the streams once it is back."""
    from connectors.embedded import EmbeddedRedis

    with EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as redis:
        seed_stream(redis.url, 1, event_windows=(0,))
        server = WebServer(redis.url, "127.0.0.1", 0).start()
        try:
            api = httpx.Client(base_url=server.url, timeout=30)
            snapshot = api.get("/api/streams/cam1/events").json()[0]["snapshot_url"]
            assert api.get("/api/streams").status_code == 200
            redis.stop()
            gets = ["/api/streams", "/api/streams/cam1", "/api/streams/cam1/captions", "/api/streams/cam1/events",
                    "/api/streams/cam1/frame.jpg", snapshot, "/api/streams/cam1/captions.jsonl",
                    "/api/streams/cam1/captions.vtt"]
            down = [api.get(path) for path in gets]
            down.append(api.post("/api/streams/cam1/questions", json={"text": "anyone?", "timeout_s": 1}))
            down.append(api.get("/api/search", params={"q": "window"}))
            down.append(api.post("/api/streams/cam1/report", json={"since": "1h", "timeout_s": 1}))
            down.append(api.post("/api/streams/cam1/events/bay:1:0/ack", json={"by": "Dana"}))
            for response in down:
                assert response.status_code == 503, (response.request.url, response.text)
                assert response.json()["detail"].startswith("Redis unreachable"), response.text
            pages = ["/", "/streams/cam1", "/docs", "/login", "/openapi.json"]
            assert [api.get(path).status_code for path in pages] == [200] * len(pages)
            # every route is one of those (or the update stream, below)
            routes = {route.path for route in server.app.routes if hasattr(route, "methods")}
            named = {"/api/streams/{stream}" + p.removeprefix("/api/streams/cam1") for p in gets[1:] if p != snapshot}
            assert routes == {*gets[:1], *named, "/api/streams/{stream}/snapshots/{snapshot_id}.jpg",
                              "/api/streams/{stream}/questions", "/streams/{stream}", "/api/updates",
                              "/api/search", "/api/streams/{stream}/report", "/api/streams/{stream}/events/{event_id}/ack",
                              *(p for p in pages if p != "/streams/cam1")}, routes

            updates = []
            sse = httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=None))
            with sse, sse.stream("GET", "/api/updates") as response:
                assert response.status_code == 200  # a browser's EventSource gives up on an error status
                lines = response.iter_lines()
                for line in lines:
                    updates.append(line)
                    if line.startswith("data: ") and "Redis unreachable" in line:
                        break
                redis.start()  # same port, its data back from the append-only file
                for line in lines:
                    updates.append(line)
                    if line.startswith("data: ") and '"id": "cam1"' in line:
                        break
            assert "event: redis" in updates and updates[-2] == "event: stream", updates
            assert api.get("/api/streams").status_code == 200  # the app serves again without a restart
        finally:
            server.stop()


def test_an_older_window_never_replaces_the_newer_picture(redis_url):
    from connectors.client import SlowFastClient
    from connectors.publisher import PublishResult

    with Publisher(redis_url) as pub, SlowFastClient(redis_url) as client:
        info = pub.register_stream(StreamInfo(id="cam1", source="/data/a.mp4"))
        newer, older = make_caption(2, run=info.run), make_caption(1, run=info.run)
        assert pub.publish_window(newer, frame=window_picture(picture(2), newer)) == PublishResult.PUBLISHED
        late = pub.publish_window(older, events=[make_event(1, run=info.run)], frame=window_picture(picture(1), older))
        assert late == PublishResult.OUT_OF_ORDER
        frame_info, jpeg = client.frame("cam1")
        assert frame_info.window == 2 and jpeg == window_picture(picture(2), newer)[1]
        # An event that did get in (its stream had nothing newer) keeps its own window's picture.
        for event in client.events("cam1"):
            assert client.snapshot("cam1", event.snapshot_id) == window_picture(picture(1), older)[1]


def test_slowfast_web_stops_cleanly_on_ctrl_c_and_names_a_taken_port(redis_url):
    import signal
    import socket

    slowfast = str(Path(sys.executable).parent / "slowfast")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([slowfast, "web", "--redis-url", redis_url, "--port", str(port)],
                                 capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == f"error: cannot serve the web page on 127.0.0.1, port {port}: Address already in use"

    proc = subprocess.Popen([slowfast, "web", "--redis-url", redis_url, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = proc.stdout.readline().split()[2]
        with httpx.stream("GET", url + "api/updates", timeout=30) as updates:  # an open update stream
            next(updates.iter_lines())
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stdout.read()
    finally:
        proc.kill()
