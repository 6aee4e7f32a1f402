"""The local Ray a run starts (pipeline.ray_session.start_ray), for real: its GCS keeps no
state per actor call, however many calls the run makes, and its workers export metrics every 30 s."""

from __future__ import annotations

import subprocess
import sys

import pytest

CALLS = 20_000
# In a process of its own: a fresh local Ray, whatever this test session started.
SCRIPT = f"""
import os, time
import ray
from bench.soak import child_process, proc_stats
from pipeline.config import load_config
from pipeline.ray_session import start_ray

start_ray(load_config(None, metrics_port=0))
gcs = child_process("gcs_server", os.getpid())

def rss_mb():
    return proc_stats(gcs)[0]

@ray.remote
class Echo:
    def call(self, x):
        return x

echo = Echo.remote()
ray.get(echo.call.remote(0))
time.sleep(3)  # the GCS settles after start-up
before = rss_mb()
for _ in range({CALLS} // 1000):
    ray.get([echo.call.remote(i) for i in range(1000)])
time.sleep(5)  # task events, were they recorded, reach the GCS every second
print(rss_mb() - before)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gcs_of_a_runs_local_ray_keeps_no_events_of_its_calls():
    """Ray records every task's events for its dashboard and state API. 20,000 calls grew the GCS
    by about 66 MB with Ray's defaults, and by 13-17 MB with the events capped at 1,000 tasks
    (it remembers each evicted one); with none recorded, by under 2 MB."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = float(done.stdout.strip().splitlines()[-1])
    assert growth < 6, f"the GCS grew {growth:.1f} MB over {CALLS} actor calls"


INTERVAL_SCRIPT = """
import ray
from pipeline.config import load_config
from pipeline.ray_session import start_ray

start_ray(load_config(None, metrics_port=0))

@ray.remote
def export_interval_ms():
    return ray._config.metrics_report_interval_ms()

print(ray.get(export_interval_ms.remote()))
"""


@pytest.mark.slow(seconds=20)
@pytest.mark.timeout(300)
def test_the_workers_of_a_runs_local_ray_export_metrics_every_30_s():
    """Every Ray process keeps some memory for good at each metrics export: an idle actor grew
    +5-7 MB/h at Ray's export every 10 s, about +2 MB/h every 30 s."""
    done = subprocess.run([sys.executable, "-c", INTERVAL_SCRIPT], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == 30_000
