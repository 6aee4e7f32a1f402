"""Memory Ray keeps for every actor a run creates: what an ingest actor for every file would
cost a run that stays up for days, against the pipeline's way, files taking turns on one.

A local Ray; its driver creates, calls and kills actors the way a run with an ingest actor for
every file would: a named actor (restartable, as ingest actors are), its run() and node_id()
called, killed once run() returned. After a warm-up round, each round of actors is followed by
a pause and the RSS of the driver, the GCS and the raylet is read; the kept KB per actor is the
least-squares slope over the rounds. Baseline, in the same Ray: run() and node_id() called on
one actor (25 pairs for each actor created), the cost per call and the pipeline's way for
files. Both are measured; the MB a day of a run that takes a file every few minutes is derived
from them.

    python -m bench.actor_churn_bench [--rounds 5] [--actors 40] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence

import ray

from pipeline.ray_session import JEMALLOC_ON_WORKERS, LOCAL_RAY_SYSTEM_CONFIG

from .common import parse_args
from .soak import child_process, proc_stats

PROCESSES = ("driver", "gcs_server", "raylet")
FILE_EVERY_MIN = 2.0  # the soak's long file: a new stream, so a new ingest actor, this often
# The baseline makes this many times as many call pairs as there are actors: a call keeps far
# less than an actor, and its slope has to stand out of the RSS noise of about a MB.
CALLS_PER_ACTOR = 25


@ray.remote(num_cpus=0.01, max_restarts=-1)
class FileRun:
    """Stands in for an ingest actor: the calls the driver makes on one, nothing else."""

    async def run(self) -> int:
        return os.getpid()

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    return {name: proc_stats(pid)[0] for name, pid in pids.items()}


def run_files(first: int, count: int) -> None:
    for n in range(first, first + count):
        actor = FileRun.options(name=f"ingest:file-{n}").remote()
        ray.get([actor.run.remote(), actor.node_id.remote()])
        ray.kill(actor, no_restart=True)
    gc.collect()


def kept_kb(xs: list[float], samples: list[dict[str, float]]) -> dict[str, float]:
    """The least-squares slope of each process's RSS against `xs`, in KB per unit of x."""
    return {name: 1024 * statistics.linear_regression(xs, [s[name] for s in samples]).slope for name in PROCESSES}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of actors after the warm-up round")
    parser.add_argument("--actors", type=int, default=40, help="actors per round")
    parser.add_argument("--pause", type=float, default=10.0, help="seconds after each round before reading RSS")
    args = parse_args(parser, argv, smoke=dict(rounds=2, actors=4, pause=1.0))
    os.environ.update(JEMALLOC_ON_WORKERS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    pids = {"driver": os.getpid(), "gcs_server": child_process("gcs_server", os.getpid()),
            "raylet": child_process("raylet", os.getpid())}
    run_files(0, args.actors)  # warm-up: the worker pool, the first names, lazily built caches
    time.sleep(args.pause)
    created, samples = [0.0], [rss_mb(pids)]
    for round_index in range(args.rounds):
        run_files(args.actors * (round_index + 1), args.actors)
        time.sleep(args.pause)
        created.append(float(args.actors * (round_index + 1)))
        samples.append(rss_mb(pids))
    per_actor = kept_kb(created, samples)

    one = FileRun.remote()
    ray.get(one.run.remote())
    calls, call_samples = [0.0], [rss_mb(pids)]
    for round_index in range(args.rounds):
        for _ in range(args.actors * CALLS_PER_ACTOR):
            ray.get([one.run.remote(), one.node_id.remote()])
        gc.collect()
        time.sleep(args.pause)
        calls.append(float(args.actors * CALLS_PER_ACTOR * (round_index + 1)))
        call_samples.append(rss_mb(pids))
    per_call = kept_kb(calls, call_samples)
    ray.shutdown()

    files_a_day = 24 * 60 / FILE_EVERY_MIN
    print(f"RSS kept, {args.rounds} rounds of {args.actors} after a warm-up round (measured; ratio: per actor "
          "created, called and killed, against the same calls on one actor):")
    for name in PROCESSES:
        ratio = f"{per_actor[name] / per_call[name]:7.1f}x" if per_call[name] > 0.05 else "    n/a"
        print(f"  {name:<11} {per_actor[name]:+8.1f} KB/actor   {per_call[name]:+7.2f} KB/call pair   {ratio}")
    total = sum(per_actor.values())
    print(f"  together   {total:+8.1f} KB/actor: {total * files_a_day / 1024:+.1f} MB a day at a file every "
          f"{FILE_EVERY_MIN:g} minutes (derived)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
