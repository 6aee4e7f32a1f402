"""bench/model_bench.py runs end to end in its small mode (the GPU mode shares every code path
except the CUDA-only parity section and the compiled rows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_bench.py"


@pytest.mark.slow
def test_model_bench_small_mode_prints_ratios_against_baselines():
    args = ["--tiny", "--device", "cpu", "--batches", "1,2", "--window", "4", "--stride", "2", "--new-tokens", "3",
            "--encode-batch", "2"]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    rows = results["decode_ms_per_step"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert row["ours_eager"] > 0 and row["transformers_dynamic"] > 0 and row["transformers_static"] > 0
    assert results["tower_fps_eager"] > 0
    assert results["windows_per_s_B2"] > 0 and results["authors_way_windows_per_s"] > 0
    assert results["live_streams_per_device"] == max(results["windows_per_s_B1"], results["windows_per_s_B2"]) * 2 / 4.0
    assert "ours/transformers_static" in done.stdout
