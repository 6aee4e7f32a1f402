"""History through the real pipeline: a run of the synthetic world clip with known scenes and
the shipped model is searched through Redis, asked about (a text-only prompt on the model
worker, through the Redis question contract) and reported on; the same with the tiny random
checkpoint on entries whose content the test knows."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from connectors.client import QuestionError, SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import Caption, EntryKind, StreamInfo
from model import SlowFastVLM, TextQuery
from pipeline.cli import app as cli_app
from pipeline.config import load_config
from pipeline.demo_clip import SCENE_SECONDS, demo_scenes
from pipeline.engine.model_runner import ModelRunner
from pipeline.history import build_report, history_prompt, range_pictures, report_markdown, wall_clock
from pipeline.runner import run_pipeline
from pipeline.summaries import default_summary_every
from tests.support.model_faults import _Wrapped, worker_with
from tests.support.records import make_caption, make_event
from world.scenes import SHIPPED_MODEL, write_scene_file

RED_CIRCLE_SCENES = (1, 2, 4)
WINDOW = STRIDE = 16


@dataclass(frozen=True)
class RecordTextPrompts:
    """The real model, which first appends every text-only prompt it is given to `path`."""

    path: Path

    def __call__(self, model: Any) -> _Wrapped:
        def generate(inner, queries, **kwargs):
            with self.path.open("a", encoding="utf-8") as out:
                for query in queries:
                    if isinstance(query, TextQuery):
                        out.write(json.dumps(query.question) + "\n")
            return inner.generate(queries, **kwargs)

        return _Wrapped(model, generate)


class BackgroundRun:
    """A pipeline with no stream of its own, answering questions until stopped."""

    def __init__(self, config, **options):
        self.stop, self.events = threading.Event(), []
        self.thread = threading.Thread(target=lambda: run_pipeline(config, stop=self.stop,
                                                                   on_event=self.events.append, **options))
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()


def prompts(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_world_run_is_searched_asked_about_and_reported(ray_session, redis_url, tmp_path):
    scenes = demo_scenes(count=6, seed=11, red_circle_in=RED_CIRCLE_SCENES)
    clip = write_scene_file(tmp_path / "scenes.mp4", scenes, seconds_per_scene=SCENE_SECONDS, fps=8)
    question = {"id": "red-circle", "prompt": "Is there a red circle?", "trigger": {"p_yes_above": 0.5}}
    out = tmp_path / "out"
    config = load_config(None, redis_url=redis_url, out_dir=out, window=WINDOW, stride=STRIDE, fps=4.0,
                         streams=[{"id": "scenes", "source": str(clip), "standing_questions": [question]}],
                         generation={"max_new_tokens": 32})
    assert run_pipeline(config)["scenes"].state == "ended"
    client = SlowFastClient(redis_url)
    captions = client.history("scenes")
    said = [c.window for c in captions if "red circle" in c.text]
    assert set(said) >= set(RED_CIRCLE_SCENES) - {3}  # the model names the objects of 98% of clips

    # Search: "red circle" finds exactly the captions holding both words, those saying it first.
    hits = client.search("red circle", kinds=["caption"]).hits
    both = [c.window for c in captions if {"red", "circle"} <= set(c.text.replace(".", "").split())]
    assert sorted(h.window for h in hits) == sorted(both)
    saying = [h.window for h in hits if "red circle" in h.text]
    assert [h.window for h in hits][: len(saying)] == saying and sorted(saying) == sorted(said)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # A phrase, as the model wrote it for one window, finds only the windows that say it.
    phrase = next(p for c in captions for p in [c.text.split(" and ")[0].removeprefix("a ").rstrip(".")]
                  if p.startswith("red circle"))
    found = client.search(f'"{phrase}"').hits
    assert sorted(h.window for h in found if h.kind == "caption") == [c.window for c in captions if phrase in c.text]
    # Time and kind filter: windows captured from window 3's end on; the events the question raised.
    since = captions[3].wall_end
    assert {h.window for h in client.search("circle", kinds=["caption"], start=since).hits} == \
        {c.window for c in captions[3:] if "circle" in c.text}
    fired = client.search("red circle", kinds=["event"]).hits
    assert sorted(h.window for h in fired) == sorted(e.window for e in client.events("scenes"))

    # A pipeline that no longer runs the stream still answers about its past, on any worker.
    recorded = tmp_path / "prompts.jsonl"
    idle = load_config(None, redis_url=redis_url, out_dir=tmp_path / "idle", window=WINDOW, stride=STRIDE, fps=4.0,
                       generation={"max_new_tokens": 32})
    run = BackgroundRun(idle, worker_class=worker_with(RecordTextPrompts(recorded)))
    try:
        asked = "When was a red circle on screen?"
        answer = _retry_until_running(lambda: client.ask_history("scenes", asked, since="1h", timeout=120))
        assert answer.kind == "history" and answer.text is not None
        sources = answer.sources
        caption_sources = sorted(h.window for h in sources if h.kind == EntryKind.CAPTION)
        assert set(said) <= set(caption_sources)
        assert all({"red", "circle"} & set(h.text.replace(".", "").split()) for h in sources
                   if h.kind == EntryKind.CAPTION)
        assert {h.window for h in sources if h.kind == EntryKind.EVENT} == {e.window for e in client.events("scenes")}
        (prompt,) = prompts(recorded)
        assert prompt == history_prompt("scenes", asked, sources)  # exactly what the reply lists
        times = [h.wall_time for h in sources]
        assert times == sorted(times)  # in time order, each with its times
        positions = [prompt.index(f"[{wall_clock(h.wall_time)} | video ") for h in sources]
        assert positions == sorted(positions) and prompt.endswith(f"Question: {asked}")

        # The report on the range equals the report built from the run's JSONL of that range.
        start, end = captions[1].wall_end - 0.001, captions[4].wall_end + 0.001
        reply = client.report("scenes", start=start, end=end, timeout=300)
        report = reply.report
        assert (report.first_window, report.last_window, report.captions) == (1, 4, 4)
        lines = [json.loads(line) for line in (out / "scenes" / "captions.jsonl").read_text().splitlines()]
        from_file = [Caption(stream="scenes", window=r["window"], run=captions[0].run, start=r["start"], end=r["end"],
                             wall_start=0, wall_end=0, text=r["caption"]) for r in lines if 1 <= r["window"] <= 4]
        vlm = SlowFastVLM.from_pretrained(str(SHIPPED_MODEL))
        runner = ModelRunner(vlm, idle.generation, idle.batch_size, fetch_frames=None)
        events = client.entries_between("scenes", EntryKind.EVENT, start, end)
        in_range = client.entries_between("scenes", EntryKind.CAPTION, start, end)
        expected = build_report("scenes", start, end, from_file, events, range_pictures(client, "scenes", in_range),
                                default_summary_every(WINDOW, STRIDE, 4.0),
                                lambda ps: [r.text for r in runner.run([TextQuery(p) for p in ps])])
        assert report == expected and reply.text == report_markdown(expected)
        # Every event record of the range lies in a span of its question, and spans do not overlap.
        assert report.summary and report.events
        assert all(any(s.question_id == e.question_id and s.first_window <= e.window <= s.last_window
                       for s in report.events) for _, e in events)
        assert all(a.last_window < b.first_window for a, b in zip(report.events, report.events[1:]))

        # The CLI writes it as Markdown with the pictures Redis holds beside it.
        done = CliRunner().invoke(cli_app, ["report", "--stream", "scenes", "--from", str(start), "--to", str(end),
                                            "--out", str(tmp_path / "report.md"), "--redis-url", redis_url])
        assert done.exit_code == 0, done.output
        markdown = (tmp_path / "report.md").read_text()
        assert markdown.startswith("# Report on scenes") and report.summary.strip() in markdown
        saved = sorted((tmp_path / "report-pictures").glob("*.jpg"))
        assert len(saved) == len(report.pictures) > 0 and all(f"report-pictures/{p.name}" in markdown for p in saved)
    finally:
        run.finish()


def _retry_until_running(ask, timeout: float = 180):
    """The run needs a few seconds to start its workers: a question sent earlier waits for them
    anyway (the intake keeps it), so this only bounds the wait."""
    deadline = time.time() + timeout
    while True:
        try:
            return ask()
        except TimeoutError:
            if time.time() > deadline:
                raise


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_questions_about_the_past_with_the_tiny_checkpoint(ray_session, redis_url, tiny_model_dir, tmp_path):
    now = time.time()
    texts = {0: "a forklift parks by door 3", 1: "a white van backs up to the loading bay",
             2: "two workers unload pallets from the white van", 3: "the loading bay is empty",
             4: "a cat crosses the yard", 5: "the white van leaves the yard"}
    with Publisher(redis_url) as pub:
        info = pub.register_stream(StreamInfo(id="dock", source="rtsp://10.0.0.9/main"))
        for w, text in texts.items():
            caption = make_caption(w, stream="dock", run=info.run, text=text, wall_end=now - 600 + 60 * w)
            events = [make_event(w, stream="dock", run=info.run, question="Is a vehicle at the gate?",
                                 text="Yes", wall_end=caption.wall_end)] if "van" in text else []
            pub.publish_window(caption, events=events)
    recorded = tmp_path / "prompts.jsonl"
    config = load_config(None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path, window=8, stride=4,
                         fps=4.0, generation={"max_new_tokens": 5})
    run = BackgroundRun(config, worker_class=worker_with(RecordTextPrompts(recorded)))
    client = SlowFastClient(redis_url)
    try:
        answer = _retry_until_running(lambda: client.ask_history("dock", "When was the white van here?",
                                                                 start=now - 600 + 30, end=now, timeout=120))
        # The captions that name the van (its events' question does not), all inside the range.
        assert [h.window for h in answer.sources] == [1, 2, 5]
        assert {h.kind for h in answer.sources} == {EntryKind.CAPTION}
        (prompt,) = prompts(recorded)
        assert prompt == history_prompt("dock", "When was the white van here?", answer.sources)
        order = [prompt.index(texts[w]) for w in (1, 2, 5)]
        assert order == sorted(order) and all(wall_clock(now - 600 + 60 * w) in prompt for w in (1, 2, 5))

        # The CLI prints the answer and the entries it drew on; bad input is one line.
        runner = CliRunner()
        done = runner.invoke(cli_app, ["ask", "--stream", "dock", "--since", "30m", "Who unloaded pallets?",
                                       "--redis-url", redis_url, "--timeout", "120"])
        assert done.exit_code == 0, done.output
        assert "drawn from" in done.stdout and "two workers unload pallets" in done.stdout
        for args, message in [(["ask", "--stream", "dock", "--since", "soon", "Q?"], "invalid duration"),
                              (["ask", "--stream", "dock", "--since", "1h", "--yes-no", "Q?"], "--yes-no"),
                              (["ask", "--stream", "dock"], "STREAM QUESTION"),
                              (["ask", "--stream", "bad id", "--since", "1h", "Q?"], "invalid stream id")]:
            failed = runner.invoke(cli_app, [*args, "--redis-url", redis_url])
            assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and message in failed.stderr, \
                (args, failed.output)
        # A range with nothing in it: an error reply of the history kind, one line in the CLI.
        with pytest.raises(QuestionError) as empty:
            client.ask_history("dock", "Anything?", start=now + 3600, timeout=60)
        assert empty.value.reply.kind == "history" and "in that range" in empty.value.reply.error
        # The ordinary question about the latest window is unchanged beside it.
        with pytest.raises(QuestionError, match="not running"):
            client.ask("dock", "What is there?", timeout=60)
    finally:
        run.finish()
