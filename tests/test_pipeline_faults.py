"""Faults caused for real, on real Ray, Redis, an RTSP server and the tiny model: a model that
raises on some windows (a question longer than its context), a camera's ingest actor killed with
a window's frames, a damaged recording, a camera that drops and comes back, a camera refused at
start, and more streams than the cluster has cores for at once. What they count reaches the
Prometheus export as well as the status."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import time
import urllib.request

import pytest

from bench.soak import child_pids, parent_pid
from connectors.client import SlowFastClient
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState
from model.random_checkpoint import write_random_checkpoint
from pipeline.metric_labels import FILES_LABEL
from tests.support.background_run import BackgroundRun, wait_until
from tests.support.media import cfr_times, damage, free_port, make_clip
from tests.support.model_faults import HoldWhileFileExists, worker_with
from tests.test_pipeline_e2e import clip, pipeline_config  # noqa: F401 - clip: a fixture

TOO_LONG_PROMPT = "Is anyone walking through the loading bay right now? " * 20  # ~1,000 characters


def test_a_damaged_recordings_corrupt_frames_are_counted_apart_from_dropped_ones(
    ray_session, redis_url, tiny_model_dir, tmp_path
):
    """20 KB of noise in the middle of a recording: the decoder skips what it cannot use and the
    status counts it in `frames_corrupt`; `frames_dropped` stays for frames no processed window
    covered, none in a file (its windows are never skipped)."""
    clean = make_clip(tmp_path / "clean.ts", cfr_times(30, 10)).path
    corrupt = damage(clean, tmp_path / "corrupt.ts", garbage=(0.5, 20_000))
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [{"id": "damaged", "source": str(corrupt)}])
    summary = BackgroundRun(config).finish(stop=False, timeout=240)["damaged"]
    assert summary.state == "ended" and summary.stats.windows_done == summary.windows > 0
    status = SlowFastClient(redis_url).status("damaged")
    assert status.frames_corrupt >= 1 and status.frames_dropped == 0


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory):
    """30 s at 25 fps, a keyframe every 10 frames so a (re)joining client starts fast."""
    return make_clip(tmp_path_factory.mktemp("camera") / "camera.mp4", cfr_times(25, 30),
                     options={"preset": "veryfast", "bf": "2", "g": "10"}).path


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The random checkpoint with a context of 900 tokens: an 8-frame window (648 video tokens)
    and the caption prompt fit, a standing question of a thousand characters does not."""
    return write_random_checkpoint(tmp_path_factory.mktemp("short-context"), seed=0, max_position_embeddings=900,
                                   tokenizer_model_max_length=900)


def test_a_window_the_model_fails_on_is_retried_then_recorded_as_failed(
    ray_session, redis_url, short_context_model, clip, tmp_path
):
    """The model itself raises on every batch holding a standing question longer than its
    context, which windows 0, 4 and 8 carry (every_n_windows=4): each is retried once, alone,
    then recorded as failed; the other windows, batched with them at first, succeed on their
    retry. Nothing is silent: status, history, outputs and the exported metrics say so."""
    question = {"id": "long", "prompt": TOO_LONG_PROMPT, "every_n_windows": 4}
    # Added at run time, so the run outlives the file and its worker exports the final counts.
    config = pipeline_config(redis_url, short_context_model, tmp_path, [])
    before = exported()
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        client.add_stream("file", str(clip), live=False, config={"standing_questions": [question]}, timeout=120)
        wait_until(lambda: (s := client.status("file")) is not None and s.state is IngestState.ENDED, timeout=240)
        ended = client.status("file")
        metrics = wait_for_export(before, {("slowfast_windows_failed_total", FILES_LABEL): ended.windows_failed,
                                           ("slowfast_windows_done_total", FILES_LABEL): ended.windows_done})
    finally:
        summaries = run.finish()
    summary = summaries["file"]
    assert summary.state == "ended" and summary.windows == 9
    assert (summary.stats.windows_done, summary.stats.windows_failed, summary.stats.windows_skipped) == (6, 3, 0)
    # Every window went to the model in a batch, and again alone if that batch raised: a failed
    # one twice, a done one once, or twice where a failed one shared its first batch (as some did).
    done, failed = summary.stats.windows_done, summary.stats.windows_failed
    batches, alone, least, most = batch_windows(metrics)
    assert alone >= failed and batches > alone, metrics
    assert least <= 2 * (done + failed) and most >= done + 2 * failed, metrics
    assert metrics.get(("slowfast_windows_skipped_total", FILES_LABEL), 0) == 0
    assert not any(stream == "file" for _, stream in metrics)  # files count together: no label set of its own

    status = client.status("file")
    assert status.state is IngestState.ENDED
    assert (status.windows_emitted, status.windows_done, status.windows_failed) == (9, 6, 3)
    assert status.windows_done + status.windows_failed + status.windows_skipped == status.windows_emitted
    assert status.last_error.startswith("window 8 failed after 2 attempts: ModelInputError: prompt is ")
    assert "more than the context allows" in status.last_error and status.last_error_at is not None

    history = client.history("file", count=100)
    assert [c.window for c in history] == list(range(9))  # every window has an entry, in order
    failed = {c.window: c for c in history if c.error is not None}
    assert sorted(failed) == [0, 4, 8]
    assert all(c.text == "" and "more than the context allows" in c.error for c in failed.values())
    assert all(c.text for c in history if c.error is None)

    lines = [json.loads(line) for line in (tmp_path / "file" / "captions.jsonl").read_text().splitlines()]
    assert [line["window"] for line in lines] == list(range(9))
    assert [line["window"] for line in lines if "error" in line] == [0, 4, 8]
    assert (tmp_path / "file" / "captions.vtt").read_text().count("-->") == 6


def _title(pid: int) -> str:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[0].decode(errors="replace")
    return ""


def siblings_titled(pid: int, part: str) -> tuple[int, set[int]]:
    """The Ray raylet that started the worker process `pid`, and those of its workers whose
    process title names `part` (an actor class)."""
    raylet = parent_pid(pid)
    return raylet, {child for child in child_pids(raylet) if part in _title(child)}


def new_child_titled(raylet: int, part: str, known: set[int], timeout: float = 120) -> int:
    """The first worker of `raylet` not in `known` whose title names `part`: an actor's process
    as soon as it takes the actor's part (Ray sets the title before the actor's __init__)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in child_pids(raylet):
            if child not in known and part in _title(child):
                return child
        time.sleep(0.005)
    raise AssertionError(f"no new {part} process within {timeout} s")


def process_of(actor) -> int:
    """The pid of the actor's process, once a restarting actor is up again."""
    import ray

    deadline = time.monotonic() + 120
    while True:
        try:
            return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            assert time.monotonic() < deadline, "the restarted actor never came up"
            time.sleep(0.1)


@pytest.mark.slow(seconds=25)
def test_a_live_window_whose_frames_died_with_their_ingest_actor_is_skipped_and_named(
    ray_session, redis_url, tiny_model_dir, clip, tmp_path
):
    """A live camera: the worker holds its first window while the newest one waits, its frames
    owned by the ingest actor alone, and the actor is killed. That window cannot be captioned,
    and it is no model failure: it counts in `windows_skipped` (status and metric), `last_error`
    names it, and the restarted actor's windows follow it, numbered on."""
    import ray

    stream = "dock"
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [
        {"id": stream, "source": f"loop://{clip}", "live": True, "gate": {"enabled": False}}])
    gate = tmp_path / "hold"
    gate.touch()
    before = exported()
    run = BackgroundRun(config, worker_class=worker_with(HoldWhileFileExists(gate)))
    client = SlowFastClient(redis_url)

    def lane():  # the worker's own counts for the stream
        with contextlib.suppress(ValueError):  # the worker is not up yet
            return ray.get(ray.get_actor("worker:0").stats.remote()).get(stream)
        return None

    def captioned() -> list[int]:
        return [c.window for c in client.history(stream, count=1000)]

    def worker():
        return ray.get_actor("worker:0")

    def worker_error() -> str | None:  # the worker's own, before a status carries it
        return ray.get(worker().__ray_call__.remote(lambda w: w.engine.scheduler.counts(stream).last_error))

    try:
        try:
            wait_until(lambda: (s := lane()) is not None and s.queued >= 1, timeout=120)  # window 0 held, one waits
            ingest = ray.get_actor(f"ingest:{stream}")
            running = ingest.run.remote()  # fails once the incarnation that owns the frames is gone
            raylet, ingest_processes = siblings_titled(process_of(ingest), "IngestActor")
            ray.kill(ingest, no_restart=False)  # Ray restarts it (max_restarts)
            # The restarted actor is paused as soon as its process takes the part, long before it
            # has a window's frames (two seconds of a paced clip): a window of its own would
            # overtake the waiting one before the worker tries it.
            restarted = new_child_titled(raylet, "IngestActor", ingest_processes)
            os.kill(restarted, signal.SIGSTOP)
            try:
                with pytest.raises(ray.exceptions.RayActorError):
                    ray.get(running, timeout=120)
                (lost,) = ray.get(worker().__ray_call__.remote(
                    lambda worker: [w.seq for w in worker.engine.scheduler.lanes[stream].waiting]))
                overtaken = lane().windows_skipped  # windows the newest overtook while window 0 was held
                gate.unlink()
                wait_until(lambda: (worker_error() or "").startswith(f"window {lost}: "), timeout=120)
            finally:
                os.kill(restarted, signal.SIGCONT)
        finally:
            gate.unlink(missing_ok=True)
        wait_until(lambda: client.status(stream).state is IngestState.LIVE
                   and max(captioned(), default=-1) > lost, timeout=120)  # the restarted actor's windows
        status = client.status(stream)
        print(f"\nwindow {lost} lost with its ingest actor ({overtaken} overtaken while window 0 was held): "
              f"'{status.last_error}', windows_skipped {status.windows_skipped}")
        assert status.last_error.startswith(f"window {lost}: frames gone with their ingest actor"), status.last_error
        assert status.windows_skipped >= overtaken + 1 and status.windows_failed == 0
        windows = captioned()
        assert windows[0] == 0 and all(w > lost for w in windows[1:]), windows  # window 0 held, then numbered on

        ray.get(ray.get_actor(f"ingest:{stream}").stop.remote())  # no more windows: the counts stay
        wait_until(lambda: client.status(stream).state is IngestState.STOPPED)
        counts = ray.get(ray.get_actor("worker:0").stats.remote(drain=True))[stream]  # once the last is done
        metrics = wait_for_export(before, {("slowfast_windows_skipped_total", stream): counts.windows_skipped,
                                           ("slowfast_windows_done_total", stream): counts.windows_done})
    finally:
        run.finish()
    assert client.status(stream).windows_skipped == counts.windows_skipped
    # A camera's batch is its newest window: one batch for each window done, one for the window
    # whose frames were gone, and one for any other the dead actor had in flight to the worker
    # (each skipped too; a window overtaken while waiting is skipped without a batch).
    batches, alone, least, most = batch_windows(metrics)
    assert batches == alone == least == most, metrics
    assert counts.windows_done + 1 <= batches <= counts.windows_done + counts.windows_skipped, (metrics, counts)
    assert metrics.get(("slowfast_windows_failed_total", stream), 0) == 0


def exported() -> dict[tuple[str, str], float]:
    """The pipeline's samples as Ray's Prometheus endpoint on this node serves them, parsed by
    prometheus_client: (sample name without Ray's `ray_` prefix, its stream, or for the buckets of
    a histogram without one their bound) -> value, summed over the rest of the labels. Ray keeps each count for the
    whole Ray session and over all the processes that added to it (earlier tests' workers too):
    a test reads what its run added, against a reading from before it."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("ray_slowfast_"):
                key = (sample.name.removeprefix("ray_"), sample.labels.get("stream", sample.labels.get("le", "")))
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def wait_for_export(before: dict[tuple[str, str], float], wanted: dict[tuple[str, str], float],
                    timeout: float = 120) -> dict[tuple[str, str], float]:
    """What the run added to each exported sample since `before`, once the samples in `wanted`
    show the counts given there: Ray exports each process's metrics on its own period."""
    deadline = time.monotonic() + timeout
    while True:
        added = {key: value - before.get(key, 0.0) for key, value in exported().items()}
        if all(added.get(key, 0.0) == value for key, value in wanted.items()):
            return added
        assert time.monotonic() < deadline, f"the export never showed {wanted}: the run added {added}"
        time.sleep(0.5)


def batch_windows(added: dict[tuple[str, str], float]) -> tuple[int, int, int, float]:
    """From the `slowfast_batch_windows` histogram a run added: (batches, batches of one window,
    the fewest and the most windows they can have held in all). Ray exports the buckets exactly;
    its `_sum` is made up of the buckets' midpoints."""
    cumulative = {float(le): count for (name, le), count in added.items() if name == "slowfast_batch_windows_bucket"}
    least, most, below, previous = 0, 0.0, 0.0, 0.0
    for bound in sorted(cumulative):  # a batch in bucket (previous, bound] held previous+1 .. bound windows
        batches = cumulative[bound] - below
        least, most = least + int(batches) * (int(previous) + 1), most + batches * bound if batches else most
        below, previous = cumulative[bound], bound
    return int(cumulative.get(float("inf"), 0)), int(cumulative.get(1.0, 0)), least, most


def status_refreshes(client: SlowFastClient, stream: str, count: int, timeout: float = 120) -> list[float]:
    """The first `count` distinct `updated_at` values of a stream's status (the publisher's own
    clock), polled until they are there."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {len(seen)} status refreshes in {timeout:.0f} s"
        status = client.status(stream)
        if status is not None and (not seen or status.updated_at != seen[-1]):
            seen.append(status.updated_at)
        time.sleep(0.05)
    return seen


@pytest.mark.slow(seconds=30)
def test_a_camera_whose_model_worker_stops_answering_keeps_a_fresh_status_that_says_why_captions_wait(
    ray_session, redis_url, tiny_model_dir, clip, tmp_path
):
    """The worker publishes each stream's status. While it answers nothing (its process
    stopped here; killed and restarting in a real run), the camera's ingest actor writes its own
    side: the status stays fresh and live, keeps the worker's counts and names the worker in
    `last_error`. Once the worker answers again, its status replaces that, and captions go on."""
    import ray

    stream = "gate"
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [
        {"id": stream, "source": f"loop://{clip}", "live": True, "gate": {"enabled": False}}])
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: client.history(stream, count=1), timeout=180)
        worker = process_of(ray.get_actor("worker:0"))
        os.kill(worker, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            wait_until(lambda: (s := client.status(stream)).updated_at > stopped_at + 6, timeout=60)
            held = client.status(stream)
            captions = len(client.history(stream, count=1000))
        finally:
            os.kill(worker, signal.SIGCONT)
        print(f"\nworker stopped {held.updated_at - stopped_at:.1f} s: '{held.last_error}'")
        assert held.state is IngestState.LIVE and held.fps_in > 0 and held.fps_out == 0
        assert held.last_error.startswith("model worker worker:0 has not answered for "), held.last_error
        assert held.windows_done >= 1 and held.windows_done <= captions  # the worker's counts, kept
        wait_until(lambda: len(client.history(stream, count=1000)) > captions
                   and client.status(stream).last_error is None, timeout=120)
    finally:
        run.finish()


@pytest.mark.slow(seconds=40)
def test_camera_health_follows_outages_and_a_camera_refused_at_start(
    ray_session, redis_url, tiny_model_dir, tmp_path, camera_clip, rtsp_server_factory
):
    """`cam` runs, its server is killed (the status says reconnecting, and keeps being refreshed
    with no frames flowing), then restarted (live again, error cleared). `late` points at a port
    nobody listens on: connecting with the reason, then live once a server starts there."""
    cam_server = rtsp_server_factory(camera_clip).start()
    late_port = free_port()
    streams = [{"id": "cam", "source": cam_server.url(), "live": True},
               {"id": "late", "source": f"rtsp://127.0.0.1:{late_port}/cam", "live": True}]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: any(e.startswith("redis ") for e in run.events), timeout=120)  # workers up
        started = time.monotonic()  # the streams are being added now
        # (on a busy machine an ingest actor slow to start is reported first: "not placed")
        wait_until(lambda: (s := client.status("late")) is not None and "connection refused" in (s.last_error or ""),
                   timeout=120)
        late = client.status("late")
        print(f"\nrefused camera: {late.state} '{late.last_error}' {time.monotonic() - started:.1f} s "
              "after the streams were added")
        assert late.state in (IngestState.CONNECTING, IngestState.RECONNECTING)
        assert "connection refused" in late.last_error and late.last_error_at is not None

        wait_until(lambda: (s := client.status("cam")) is not None and s.state is IngestState.LIVE
                   and s.windows_done >= 1 and s.fps_in > 0)
        live = client.status("cam")
        assert live.last_error is None and live.fps_out > 0 and live.lag_s >= 0

        cam_server.stop()  # the camera loses power
        dropped = time.monotonic()
        wait_until(lambda: client.status("cam").state is IngestState.RECONNECTING)
        down = client.status("cam")
        print(f"camera drop -> reconnecting after {time.monotonic() - dropped:.1f} s: '{down.last_error}'")
        assert down.last_error is not None
        # No frames flow, and the status is still refreshed every second, as promised: the
        # heartbeat's interval, then the gaps between refreshes, with room for a loaded machine
        # (a late beat now and then) but not for a slower heartbeat, nor for refreshes only at
        # reconnect attempts (backoff doubling from 0.5 s) or reads (read_timeout, 10 s).
        assert STATUS_INTERVAL_S == 1.0
        updates = status_refreshes(client, "cam", 9)
        gaps = [b - a for a, b in zip(updates, updates[1:])]
        print(f"status refreshed without frames: gaps {', '.join(f'{g:.2f}' for g in gaps)} s")
        assert statistics.median(gaps) <= 1.5 and max(gaps) < 3.0, gaps
        assert client.status("cam").state is IngestState.RECONNECTING

        windows_before = client.status("cam").windows_done
        rtsp_server_factory(camera_clip, port=cam_server.port).start()  # power is back
        restarted = time.monotonic()
        wait_until(lambda: (s := client.status("cam")).state is IngestState.LIVE and s.windows_done > windows_before,
                   timeout=90)
        back = client.status("cam")
        print(f"camera restart -> live after {time.monotonic() - restarted:.1f} s")
        assert back.last_error is None and back.reconnects >= 1

        rtsp_server_factory(camera_clip, port=late_port).start()
        wait_until(lambda: (s := client.status("late")).state is IngestState.LIVE and s.frames_in > 0, timeout=90)
        assert client.status("late").last_error is None
    finally:
        summaries = run.finish()
    assert summaries["cam"].state == "stopped" and summaries["late"].state == "stopped"


@pytest.mark.slow(seconds=70)
def test_more_file_streams_than_the_cluster_has_room_for_all_run(ray_session, redis_url, tiny_model_dir, tmp_path):
    """2 CPUs: the model worker takes 1, each ingest actor 0.25, so 4 streams fit at once. Eight
    files added one after another at run time (as `slowfast streams add` does) all run, because
    a file that ended frees its actor at once, or runs the next file on it (never while another
    file's actor waits for room); each one's status stays in Redis."""
    import ray

    count = 8
    short = make_clip(tmp_path / "short.mp4", cfr_times(8, 2.0)).path  # 8 frames at 4 fps: one window
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [])
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        for index in range(count):
            client.add_stream(f"f{index}", str(short), live=False, timeout=60)
        ids = [f"f{index}" for index in range(count)]
        wait_until(lambda: all((s := client.status(sid)) is not None and s.state is IngestState.ENDED for sid in ids),
                   timeout=240)
        for sid in ids:
            status = client.status(sid)
            assert (status.windows_emitted, status.windows_done, status.windows_failed) == (1, 1, 0), status
            assert [c.window for c in client.history(sid)] == [0]
        # the ended files' actors are gone but the one that waits for the next file
        wait_until(lambda: len(_file_ingests(ray)) <= 1)
        assert {s.id for s in client.streams()} >= set(ids)
    finally:
        summaries = run.finish()
    assert all(summaries[sid].state == "ended" and summaries[sid].stats.windows_done == 1 for sid in ids)


@pytest.mark.slow(seconds=40)
def test_files_one_after_another_run_on_one_ingest_actor(ray_session, redis_url, tiny_model_dir, tmp_path):
    """Ray keeps memory for good in the driver, the GCS and the raylet for every actor a run
    creates: the next file runs on the actor of the file before."""
    import ray

    short = make_clip(tmp_path / "short.mp4", cfr_times(8, 2.0)).path  # 8 frames at 4 fps: one window
    run = BackgroundRun(pipeline_config(redis_url, tiny_model_dir, tmp_path, []))
    client = SlowFastClient(redis_url)
    processes = []
    try:
        for index in range(3):
            client.add_stream(f"f{index}", str(short), live=False, timeout=60)
            wait_until(lambda: any(e.startswith(f"stream f{index} done") for e in run.events), timeout=120)
            assert _file_ingests(ray) == ["ingest:files-0"]
            processes.append(ray.get(ray.get_actor("ingest:files-0").__ray_call__.remote(lambda _: os.getpid())))
    finally:
        summaries = run.finish()
    assert len(set(processes)) == 1
    for index in range(3):
        assert summaries[f"f{index}"].state == "ended" and summaries[f"f{index}"].stats.windows_done == 1
        assert [c.window for c in client.history(f"f{index}")] == [0]


@pytest.mark.slow(seconds=40)
def test_an_ended_files_actor_makes_room_for_a_stream_that_waits_for_it(ray_session, redis_url, tiny_model_dir,
                                                                       tmp_path):
    """2 CPUs: the model worker takes 1, an ingest actor 1 here, so one stream runs at a time. The
    second file's actor waits for room; the first file's actor, once its file is over, is killed
    to make it, not kept for a next file."""
    short = make_clip(tmp_path / "short.mp4", cfr_times(8, 2.0)).path  # 8 frames at 4 fps: one window
    run = BackgroundRun(pipeline_config(redis_url, tiny_model_dir, tmp_path, [], ingest_cpus=1.0))
    client = SlowFastClient(redis_url)
    try:
        for sid in ("first", "second"):
            client.add_stream(sid, str(short), live=False, timeout=60)
        wait_until(lambda: all((s := client.status(sid)) is not None and s.state is IngestState.ENDED
                               for sid in ("first", "second")), timeout=120)
    finally:
        summaries = run.finish()
    assert all(summaries[sid].state == "ended" and summaries[sid].stats.windows_done == 1 for sid in ("first", "second"))


def _file_ingests(ray) -> list[str]:
    """Names of the file ingest actors alive."""
    return sorted(n for n in ray.util.list_named_actors() if n.startswith("ingest:files-"))
