"""A model worker's start: the compile cache it is configured with, and the decode shapes it
warms up (only those its configuration can produce)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model import SlowFastVLM, generation
from pipeline.actors import ModelWorker
from pipeline.config import PipelineConfig, StandingQuestion, StreamConfig
from pipeline.engine.batch_rows import batch_row_counts

ROOT = Path(__file__).resolve().parents[1]


def test_warm_up_compiles_the_decode_step_once_per_padded_row_count_the_config_allows(tiny_model_dir):
    question = StandingQuestion(id="smoke", prompt="Is there smoke?", trigger={"p_yes_above": 0.5})
    config = PipelineConfig(window=4, stride=2, batch_size=2,
                            streams=[StreamConfig(id="bay", source="rtsp://camera/bay", standing_questions=[question]),
                                     StreamConfig(id="gate", source="rtsp://camera/gate")])
    # Two windows, each with its caption and the one standing question: up to 4 rows.
    assert batch_row_counts(config) == range(1, 5)
    assert batch_row_counts(PipelineConfig(batch_size=3)) == range(1, 4)

    vlm = SlowFastVLM.from_pretrained(tiny_model_dir, device="cpu", compile=False)
    # dynamo with its eager backend: the same graphs and buffers per shape, without inductor's minutes
    vlm.decoder = generation.Decoder(vlm.network, compile=True, backend="eager")
    assert vlm.warm_up(config.window, 2, batch_row_counts(config)) > 0
    assert sorted(rows for rows, _ in vlm.decoder._buffers) == [1, 2, 4]  # 3 rows pad to 4; nothing past 4


def test_a_worker_compiles_into_the_configured_cache_directory(tiny_model_dir, tmp_path):
    """After load_model, what the worker's process compiles lands in compile_cache_dir (a new
    process: the cache's location is per process)."""
    cache = tmp_path / "compile-cache"
    script = textwrap.dedent(f"""
        import torch
        from pipeline.actors import ModelWorker
        from pipeline.config import PipelineConfig

        config = PipelineConfig(device="cpu", window=4, stride=2, batch_size=1, compile_cache_dir={str(cache)!r})
        ModelWorker.load_model(config, {str(tiny_model_dir)!r})
        assert torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).tolist() == [3.0, 3.0, 3.0]
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.relative_to(cache).parts[0] == "fxgraph" for p in written), sorted(map(str, written))[:20]


@pytest.mark.parametrize("unusable", ["a file", "with a space"])
def test_an_unusable_compile_cache_directory_costs_the_cache_only(unusable, tiny_model_dir, tmp_path, caplog,
                                                                 monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test, whatever happens
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / unusable
    if unusable == "a file":
        directory.write_text("not a directory")
    config = PipelineConfig(device="cpu", window=4, stride=2, batch_size=1, compile_cache_dir=directory)
    with caplog.at_level(logging.WARNING, logger="slowfast.pipeline"):
        vlm = ModelWorker.load_model(config, str(tiny_model_dir))
    assert isinstance(vlm, SlowFastVLM)
    (record,) = [r for r in caplog.records if "compile cache" in r.getMessage()]
    assert str(directory) in record.getMessage() and "compiling without it" in record.getMessage()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
