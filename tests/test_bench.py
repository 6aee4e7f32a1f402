"""Every bench runs end to end in its smoke mode (`python -m bench.X --smoke`), as a module,
with the repository's packages but not its tests on the path, and prints its figures and
ratios. The figures themselves mean nothing at these sizes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.rtsp import rtsp_server_available
from tests.support.system_parts import missing_part

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?\d+(?:\.\d+)?)"


def run_bench(name: str, tmp_path: Path, *args: str, timeout: float = 540) -> str:
    """stdout of `python -m bench.<name> --smoke *args`, run where everything in the repository
    but tests/ can be imported: a bench that imports from tests/ fails here."""
    path = tmp_path / "repository-without-tests"
    path.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "tests" and not entry.name.startswith("."):
            (path / entry.name).symlink_to(entry)
    env = os.environ | {"PYTHONPATH": str(path)}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--smoke", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return done.stdout


def figure(pattern: str, text: str) -> list[float]:
    """The numbers of the one line matching `pattern` (NUMBER marks each)."""
    found = re.findall(pattern.replace("{N}", NUMBER), text, flags=re.MULTILINE)
    assert len(found) == 1, f"{pattern!r} not once in:\n{text}"
    return [float(v) for v in (found[0] if isinstance(found[0], tuple) else (found[0],))]


def test_benches_import_nothing_from_tests_and_leave_sys_path_alone():
    for source in sorted((ROOT / "bench").glob("*.py")):
        text = source.read_text()
        assert not re.search(r"^\s*(from|import) tests\b", text, flags=re.MULTILINE), source.name
        assert "sys.path" not in text, source.name


def test_the_authors_way_keeps_no_autograd_graph(tiny_vlm):
    """Outside inference mode autograd kept every activation of the tower: out of memory on a
    GPU at batch 1."""
    from bench.model_bench import authors_features

    assert torch.is_inference(authors_features(tiny_vlm, torch.zeros(2, 3, 576, 576), 2))


@pytest.mark.slow(seconds=135)
@pytest.mark.timeout(1500)
def test_model_bench_prints_ratios_against_baselines(tmp_path):
    """The smoke run compiles with inductor on CPU: the CUDA default's branches run here too."""
    out = run_bench("model_bench", tmp_path, timeout=1440)
    results = json.loads(out.strip().splitlines()[-1])
    assert results["compiled"] is True
    (row,) = results["decode_ms_per_step"]
    assert row["batch"] == 1 and row["ours_eager"] > 0 and row["ours_compiled"] > 0
    assert row["transformers_dynamic"] > 0 and row["transformers_static"] > 0
    # One line per decode attention backend a CPU runs, each compiled, against sdpa in the same run.
    assert results["decode_attention"] == "sdpa" and row["attention_sdpa"] > 0 and row["attention_flex"] > 0
    for backend in ("sdpa", "flex"):
        ms, ratio = figure(rf"^ +decode attention {backend}: {{N}} ms/step compiled, {{N}}x sdpa's time$", out)
        assert ms == pytest.approx(row[f"attention_{backend}"], abs=0.01)
        assert ratio == pytest.approx(row[f"attention_{backend}"] / row["attention_sdpa"], abs=0.01)
    assert results["tower_fps_compiled"] > 0
    # A second start loads what the first compiled (0.13x of its warm-up, measured on this VM).
    first, second, ratio = figure(r"^start-up: warm-up {N} s first, {N} s second with the compile cache \({N}x\)", out)
    assert first > 0 and second > 0 and ratio == pytest.approx(second / first, abs=0.01) and ratio < 0.5
    for label in ("tiny", "mid_size"):
        line = rf"^standing yes/no questions per window, {label}, windows per call 1: none {{N}} ms " \
               r"\({N}% before decoding\), 1: {N} ms \({N}x\), 2: {N} ms \({N}x\), 4: {N} ms \({N}x\) \(CPU time\)$"
        none, share, one, one_ratio, _, _, four, four_ratio = figure(line, out)
        assert none > 0 and 0 < share and one_ratio == pytest.approx(one / none, abs=0.01)
        assert four_ratio == pytest.approx(four / none, abs=0.01)
    assert results["window"] == 4 and results["new_tokens"] == 3  # the smoke sizes
    assert results["tower_fps_eager"] > 0 and results["preprocess_vs_clip_processor"] > 0
    assert results["windows_per_s_B1"] > 0 and results["authors_way_windows_per_s"] > 0
    assert results["live_streams_per_device"] == results["windows_per_s_B1"] * 2 / 4.0
    assert len(re.findall(r"ours/transformers_(dynamic|static): [\d.]+x the time", out)) == 2


@pytest.mark.slow(seconds=30)
@pytest.mark.timeout(600)
def test_decode_bench_prints_each_reader_against_ffmpeg(tmp_path):
    out = run_bench("decode_bench", tmp_path)
    assert figure(r"^file: h264 1920x1080, .*, {N} frames; cores", out) == [15.0]  # 0.5 s at 30 fps
    rows = {}
    for name in ("ffmpeg -f null", "pyav decode", "source 4 fps @576", "source skip_nonref"):
        seconds, rate, ratio = figure(rf"^{re.escape(name)} +{{N}} s +{{N}} frames/s +{{N}}x ffmpeg$", out)
        assert seconds > 0 and rate > 0 and ratio > 0
        rows[name] = ratio
    assert rows["ffmpeg -f null"] == 1.0


@pytest.mark.slow(seconds=60)
@pytest.mark.timeout(600)
def test_pipeline_bench_prints_the_pipeline_against_the_model_alone(tmp_path):
    out = run_bench("pipeline_bench", tmp_path)
    assert figure(r"^device: .*; window 8, stride 4, 4.0 fps, 2 new tokens, {N} windows$", out) == [3.0]
    (direct,) = figure(r"^direct model per window: +{N} ms +\(baseline\)$", out)
    per_window, _, windows = figure(r"^pipeline per window \(file run\): +{N} ms .* whole run {N} s for {N} windows", out)
    assert direct > 0 and per_window > 0 and windows == 3
    figure(r"^pipeline overhead per window: +{N} ms", out)
    (ratio,) = figure(r"^pipeline / direct: +{N}x$", out)
    assert ratio == pytest.approx(per_window / direct, abs=0.01)
    p50, p95 = figure(r"^latency p50 / p95: +{N} / {N} s$", out)
    assert 0 < p50 <= p95
    figure(r"^  live x1: windows done per camera {N}\.\.{N} \(about {N} closed in 2 s\), {N} skipped", out)
    assert figure(r"^live streams sustained without skipping: {N}$", out)[0] in (0, 1)


@pytest.mark.slow(seconds=105)
@pytest.mark.timeout(900)
def test_long_video_bench_prints_one_hour_and_the_split_over_two_workers_measured_and_derived(tmp_path):
    out = run_bench("long_video_bench", tmp_path, "--workers", "2", "--seconds", "20", "--split-min-s", "2",
                    timeout=840)
    figure(r"^clip 20 s \(30 fps H.264 640x360, B-frames\): {N} windows, {N} rolling summaries", out)
    for part in ("decode alone", "model alone"):
        clip_s, hour_s = figure(rf"^  {part} +{{N}} s for the clip.* -> +{{N}} s per hour", out)
        assert clip_s > 0 and hour_s > 0
    figure(r"^  pipeline \(Ray\+Redis\) +{N} s steady for {N} windows -> +{N} s per hour; start-up {N} s once$", out)
    figure(r"^  overhead +{N} s per hour", out)
    seconds, real_time = figure(r"^  ONE HOUR: {N} s \({N}x real time\)$", out)
    assert seconds > 0 and real_time == pytest.approx(seconds / 3600, abs=0.01)
    (gpu_hour,) = figure(r"^  ONE HOUR: ~{N} s \(the larger of the two; they overlap\)$", out)
    assert gpu_hour > 0
    size, frames = figure(r"^SPLIT over 2 model workers: 2 segments of about {N} windows over 2 model workers "
                          r"\({N} sampled frames\)$", out)
    assert (size, frames) == (10, 80)  # 20 s at 4 fps: 19 windows of 8 at stride 4
    one, two, speedup = figure(r"^  MEASURED on this CPU \(\d+ cores\): 1 worker {N} s, 2 workers {N} s wall for the "
                               r"clip \(model loading included\) -> {N}x \(ideal 2x\)$", out)
    assert speedup == pytest.approx(one / two, abs=0.01)
    scan, scan_hour = figure(r"^  packet scan \(plans the segments, before they start\) {N} s for the clip -> {N} s per hour$", out)
    assert scan > 0
    gpu_two, gpu_one = figure(r"^  ONE HOUR on 2 GPUs: ~{N} s \(against ~{N} s on one\)$", out)
    assert 0 < gpu_two < gpu_one


@pytest.mark.slow(seconds=30)
@pytest.mark.timeout(600)
def test_search_bench_prints_upkeep_memory_latency_and_the_options_it_beat(tmp_path):
    out = run_bench("search_bench", tmp_path)
    (captions,) = figure(r"^history: 2 streams x 0.1 h, a caption every 4 s: {N} captions", out)
    assert captions == 180
    indexed, plain, extra, ratio = figure(
        r"^upkeep: {N} ms per window with the index, {N} ms without \(medians\): \+?{N} ms \({N}x\)$", out)
    assert indexed > 0 and plain > 0 and extra == pytest.approx(indexed - plain, abs=0.011)
    per_caption, _, _, caption_bytes, _ = figure(
        r"^memory: index {N} B per caption \({N} MiB in {N} keys\), captions {N} B per caption; index / captions {N}x$",
        out)
    assert per_caption > 0 and caption_bytes > 0
    p50, p99, queries = figure(r"^search: p50 {N} ms, p99 {N} ms over {N} queries$", out)
    assert 0 < p50 <= p99 and queries == 21
    figure(r"^scan without index: {N} ms per query \({N}x the indexed p50\)$", out)
    figure(r"^rebuild in process on start: {N} s to read and tokenise every caption", out)


def test_gate_bench_prints_windows_and_frames_with_and_without_the_gate(tmp_path):
    out = run_bench("gate_bench", tmp_path)
    without = figure(r"^without gate: {N} of {N} windows to the model \({N} GPU windows per camera-hour", out)
    with_gate = figure(r"^with gate: {N} of {N} windows to the model \({N} GPU windows per camera-hour", out)
    assert without[0] == without[1] == with_gate[1] and with_gate[0] < without[0]
    windows, frames = figure(r"^gate / no gate: windows {N}, frames {N}", out)
    assert windows == round(with_gate[0] / without[0], 3) and 0 < frames < 1


@pytest.mark.slow(seconds=40)
def test_ray_memory_bench_prints_each_settings_growth_against_rays_default(tmp_path):
    out = run_bench("ray_memory_bench", tmp_path)
    assert "ratio: against metrics every 10 s (Ray's default)" in out
    rows = {name: line for name in ("metrics every 10 s (Ray's default)", "the run's", "metrics off")
            for line in out.splitlines() if line.strip().startswith(name)}
    assert len(rows) == 3, out
    for line in rows.values():  # one growth figure per process, each with its ratio
        assert len(re.findall(r"[+-]\d+\.\d\d \(", line)) == 5, line


@pytest.mark.slow(seconds=30)
def test_frame_store_bench_prints_the_pipelines_groups_against_one_object_per_frame(tmp_path):
    out = run_bench("frame_store_bench", tmp_path)
    assert "ratio against the baseline" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("one object per frame", "groups of 8"))]
    assert len(rows) == 2, out
    for line in rows:  # the owner's live heap (jemalloc, with its ratio) and anonymous RSS, each per frame
        assert re.search(r"live heap +[+-]\d+ B/frame \([+-]\d+\.\d\d MB/h, +(-?\d+\.\d\d|nan)x\)", line), line
        assert re.search(r"anonymous RSS +[+-]\d+ B/frame", line), line


@pytest.mark.slow(seconds=120)
@pytest.mark.timeout(1200)
def test_soak_keeps_every_stream_and_file_window_through_two_faults(tmp_path):
    """The short soak: the real run (an RTSP camera, a looping file, a long file started again when
    it ends), followed by `tail`, `events` and the web page's update stream, through an RTSP server
    kill and a Redis SIGKILL. A stream stuck or not live again, a file window lost or doubled, a
    follower that stops, descriptors, threads or the object store that pile up within the minute,
    or a run that does not drain on SIGTERM to its group fails it."""
    if not rtsp_server_available():
        missing_part("gst-rtsp-server", "make system-deps")
    out = tmp_path / "soak"
    text = run_bench("soak", tmp_path, "--out", str(out), timeout=1100)
    faults = re.findall(r"^ +\d+ s (\w+) +.*: down (\S+) s; live again within (\S+) s; captions again within (\S+) s$",
                        text, flags=re.MULTILINE)
    assert [kind for kind, *_ in faults] == ["rtsp", "redis"], text
    for check in ("streams stuck at the end (no caption in 30 s): 0", "file windows lost 0, twice 0",
                  "followers alive after every fault"):
        assert f"check: {check}: ok" in text, text
    figure(r"^check: every live stream live again after every fault: yes, within {N} s \(target <= 30\): ok$", text)
    took, = figure(r"^check: SIGTERM to the run's process group: exit 0 after {N} s, summary printed: ok$", text)
    assert took < 60
    untimed, = figure(r"^check: redis retention: longest live caption history \d+ \(history_len 150, ~ trimming: "
                      r"\+100\); \d+ keys of \d+ removed streams, {N} without a TTL: ok$", text)
    assert untimed == 0
    figure(r"^check: event notifications: {N} openings and closings, {N} delivered, {N} written down as undelivered, "
           r"0 neither: ok$", text)
    fds, threads = figure(r"^check: descriptors \+?{N}, threads \+?{N} in the pipeline's processes \(flat\): "
                          r"not judged$", text)
    assert fds <= 5 and threads <= 5, text
    low, high = figure(r"^object store after the warm-up: {N}\.\.{N} MB$", text)
    # A frame of the shipped model is 12 KB (64x64 RGB): frames held past their windows, 3 streams
    # at 4 fps, would pass 3 MB within the minute.
    assert high < 3, text
    assert re.search(r"^verdict: PASS; ", text, flags=re.MULTILINE), text
    with (out / "soak.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) >= 10 and {"driver_rss_mb", "ModelWorker_rss_mb", "redis_used_mb", "cam1_p99_s",
                                "cam1_state", "object_store_mb"} <= set(rows[0])
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow(seconds=30)
def test_actor_churn_bench_prints_each_ray_process_per_actor_against_per_call(tmp_path):
    out = run_bench("actor_churn_bench", tmp_path)
    assert "ratio: per actor created, called and killed, against the same calls on one actor" in out
    per_actor = {}
    for name in ("driver", "gcs_server", "raylet"):
        row = figure(rf"^  {name} +([+-]\d+\.\d) KB/actor +[+-]\d+\.\d\d KB/call pair +(?:-?\d+\.\d+x|n/a)$", out)
        per_actor[name] = row[0]
    total, per_day = figure(r"^  together +\+?{N} KB/actor: \+?{N} MB a day at a file every 2 minutes \(derived\)$", out)
    assert total == pytest.approx(sum(per_actor.values()), abs=0.15)
    assert per_day == pytest.approx(total * 720 / 1024, abs=0.1)
