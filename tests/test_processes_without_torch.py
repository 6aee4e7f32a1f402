"""Processes that never run the model load neither torch nor transformers (about 450 MB and,
on a loaded machine, tens of seconds each): an ingest actor's modules, a downstream client, and
the CLI's followers, each run for real in a process of its own on a real Redis."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.events import seed_events

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("torch", "transformers")
CLI = "from pipeline.cli import app; app()"


def model_modules(names) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in MODEL_PACKAGES)


def test_an_ingest_actor_and_a_client_import_no_model_library():
    """What an ingest actor's process imports: its class's module, its arguments' (stream and
    pipeline config, a split file's segment) and the model worker's class's (Ray loads it to
    make the worker's handle), plus the client and the prompt's facts."""
    done = subprocess.run([sys.executable, "-c", f"""
import sys
import connectors.client, pipeline.actors, pipeline.config, pipeline.ingest, pipeline.segments, pipeline.split
from model.errors import CheckpointError
from model.prompt import CAPTION_PROMPT, MAX_PROMPT_CHARS
print(sorted(n for n in sys.modules if n.split(".")[0] in {MODEL_PACKAGES!r}))
"""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_runs_driver_checks_the_checkpoint_without_a_model_library(tiny_model_dir, tmp_path):
    """The driver (`slowfast run`) only checks the checkpoint (its config and weight files) and
    starts the actors: the model libraries are the model workers' alone."""
    done = subprocess.run([sys.executable, "-c", f"""
import sys
import pipeline.cli, pipeline.runner, pipeline.running
from pipeline.config import load_config
from pipeline.startup import preflight
preflight(load_config(None, model={str(tiny_model_dir)!r}, redis_url=None, out_dir={str(tmp_path)!r}))
print(sorted(n for n in sys.modules if n.split(".")[0] in {MODEL_PACKAGES!r}))
"""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def imported_modules(importtime_log: Path) -> list[str]:
    """The modules a `python -X importtime` process imported, from the lines it wrote to stderr."""
    return [line.rsplit("|", 1)[1].strip() for line in importtime_log.read_text().splitlines()
            if line.startswith("import time:") and "|" in line]


def run_cli(args: list[str], stderr: Path, first_line_only: bool) -> str:
    """`slowfast ARGS` with -X importtime (its imports on stderr): to its end, or, for a follower
    that runs until stopped, until its first line of output."""
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", CLI, *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            if not first_line_only:
                out, _ = proc.communicate(timeout=120)
                assert proc.returncode == 0, (out, stderr.read_text()[-2000:])
                return out
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
            return lines.get(timeout=120)
        finally:
            proc.kill()
            proc.wait(timeout=30)


def test_the_cli_followers_import_no_model_library(redis_url, tmp_path):
    seed_events(redis_url)
    commands = {  # command -> what its output shows, so each did its work before it is judged
        "status": (["status"], False, "gate"),
        "search": (["search", "window"], False, "caption of window"),
        "events --open": (["events", "--open"], False, "Yes, a truck."),
        "tail": (["tail", "gate", "--count", "1"], True, "caption of window"),
        "events": (["events", "gate", "--count", "10"], True, "opened gate #1"),
        "web": (["web", "--port", "0"], True, "web page: http://"),
    }
    for name, (args, follows, shown) in commands.items():
        log = tmp_path / f"{name.replace(' ', '_')}.stderr"
        output = run_cli([*args, "--redis-url", redis_url], log, follows)
        assert shown in output, (name, output)
        imported = imported_modules(log)
        assert "pipeline.cli" in imported, name  # -X importtime wrote its lines
        assert model_modules(imported) == [], name
