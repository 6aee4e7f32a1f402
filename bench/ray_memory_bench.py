"""Memory growth of idle Ray processes: what Ray itself costs a run that stays up for days.

Each setting starts a local Ray of its own in a process of its own, all at the same time: two
idle actors (one inside a call that sleeps, one never called), the driver, the GCS and the
raylet. After a settling time, RSS is sampled every 10 s and each process's growth is the
least-squares slope, in MB per hour. The settings: Ray's default (metrics exported every 10 s,
the baseline), the run's own (`pipeline.ray_session.LOCAL_RAY_SYSTEM_CONFIG`) and metrics off.
Every figure is measured; nothing of the pipeline runs, so what grows here is Ray's.

    python -m bench.ray_memory_bench [--minutes 8] [--settle 60] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

from pipeline.ray_session import JEMALLOC_ON_WORKERS, LOCAL_RAY_SYSTEM_CONFIG

from .common import parse_args, slope_per_hour

SAMPLE_EVERY_S = 10.0
PROCESSES = ("actor in a call", "actor never called", "driver", "gcs_server", "raylet")

# One setting's Ray: {config}, {settle} and {minutes} are filled in; prints one JSON line.
CHILD = """
import json, os, time
import ray
from bench.soak import child_process, proc_stats

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _system_config={config})

@ray.remote(num_cpus=0)
class Idle:
    def pid(self):
        return os.getpid()
    def sleep(self, seconds):
        time.sleep(seconds)

called, never = Idle.remote(), Idle.remote()
pids = dict(zip({processes!r}, [ray.get(called.pid.remote()), ray.get(never.pid.remote()), os.getpid(),
                                 child_process("gcs_server", os.getpid()), child_process("raylet", os.getpid())]))
call = called.sleep.remote({settle} + {minutes} * 60 + 60)
time.sleep({settle})
start, samples = time.time(), []
while time.time() - start < {minutes} * 60:
    samples.append((time.time() - start, {{name: proc_stats(pid)[0] for name, pid in pids.items()}}))
    time.sleep({every})
print(json.dumps(samples))
"""


def settings() -> dict[str, dict]:
    return {"metrics every 10 s (Ray's default)": {**LOCAL_RAY_SYSTEM_CONFIG, "metrics_report_interval_ms": 10_000},
            "the run's": LOCAL_RAY_SYSTEM_CONFIG,
            "metrics off": {**LOCAL_RAY_SYSTEM_CONFIG, "enable_metrics_collection": False}}


def growth_mb_per_hour(samples: list[tuple[float, dict[str, float]]], name: str) -> float:
    return slope_per_hour([t for t, _ in samples], [s[name] for _, s in samples]) if len(samples) >= 3 else 0.0


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:5.2f}x" if baseline > 0.05 else "  n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="sampled time after settling")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds after start-up not sampled")
    args = parse_args(parser, argv, smoke=dict(minutes=0.5, settle=5.0))
    env = {**os.environ, **JEMALLOC_ON_WORKERS, "RAY_USAGE_STATS_ENABLED": "0"}
    children = {name: subprocess.Popen(
        [sys.executable, "-c", CHILD.format(config=repr(config), settle=args.settle, minutes=args.minutes,
                                            every=SAMPLE_EVERY_S, processes=PROCESSES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for name, config in settings().items()}
    growth: dict[str, dict[str, float]] = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=args.settle + args.minutes * 60 + 300)
        if child.returncode != 0:
            print(f"{name}: its Ray failed: {err.strip().splitlines()[-1] if err.strip() else child.returncode}")
            return 1
        samples = json.loads(out.strip().splitlines()[-1])
        growth[name] = {process: growth_mb_per_hour(samples, process) for process in PROCESSES}
    baseline = next(iter(growth))
    print(f"idle Ray processes, RSS growth in MB/h over {args.minutes:g} min after {args.settle:g} s "
          f"(measured; ratio: against {baseline}):")
    print(f"  {'setting':<36}" + "".join(f"{p:>22}" for p in PROCESSES))
    for name, row in growth.items():
        print(f"  {name:<36}" + "".join(f"{row[p]:+12.2f} ({ratio(row[p], growth[baseline][p])})" for p in PROCESSES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
