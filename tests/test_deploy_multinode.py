"""A real two-node Ray cluster on one machine: placement by resource, and losing a node.

Head: 2 CPUs + resource `model` (model workers require it). Second node: 2 CPUs + resource
`ingest` (ingest actors prefer it, softly). The pipeline runs as `slowfast run
--ray-address`; killing the second node's raylet must not stop the stream: its ingest
actor restarts on the head and captions keep coming.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from connectors.client import SlowFastClient
from tests.support.media import cfr_times, free_port, make_clip

BIN = Path(sys.executable).parent
PLACEMENT_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace="slowfast", log_to_driver=False)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({
    "ingest": ray.get(ray.get_actor("ingest:cam").node_id.remote()),
    "worker": ray.get(ray.get_actor("worker:0").node_id.remote()),
    "nodes": nodes,
}))
"""


def ray_cli(*args: str, env: dict) -> None:
    subprocess.run([str(BIN / "ray"), *args], check=True, env=env, capture_output=True, timeout=120)


def placement(address: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PLACEMENT_SCRIPT, address], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def kill_matching(pattern: str) -> None:
    subprocess.run(["pkill", "-9", "-f", pattern], check=False)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow(seconds=110)
def test_two_nodes_placement_and_recovery_from_node_loss(redis_url, tiny_model_dir, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="sfray", dir="/tmp")  # short: Ray's socket paths are length-limited
    # Ray's settings as the image sets them for `ray start` nodes (deploy/Dockerfile).
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
                        "RAY_task_events_report_interval_ms": "0", "RAY_LD_PRELOAD_ON_WORKERS": "1",
                        "RAY_metrics_report_interval_ms": "30000"}
    port, node_manager_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    clip = make_clip(tmp_path / "cam.mp4", cfr_times(8, 10.0)).path
    config = tmp_path / "slowfast.yaml"
    config.write_text(yaml.safe_dump({
        "redis_url": redis_url, "model": str(tiny_model_dir), "window": 8, "stride": 4, "fps": 4.0,
        "out_dir": str(tmp_path / "out"), "ingest_node_resource": "ingest", "worker_resources": {"model": 1},
        "generation": {"max_new_tokens": 4},
        "streams": [{"id": "cam", "source": f"loop://{clip}", "live": True}],
    }))
    driver = None
    try:
        ray_cli("start", "--head", f"--port={port}", "--num-cpus=2", '--resources={"model": 1}',
                "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)
        ray_cli("start", f"--address={address}", "--num-cpus=2", '--resources={"ingest": 2}',
                f"--node-manager-port={node_manager_port}", "--disable-usage-stats", env=env)
        driver = subprocess.Popen([str(BIN / "slowfast"), "run", "-c", str(config), "--ray-address", address],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        client = SlowFastClient(redis_url)
        captions = lambda: len(client.history("cam", count=1000))  # noqa: E731
        wait_until(lambda: captions() >= 2, 120, "first captions")

        where = placement(address, env)
        ingest_node, worker_node = where["ingest"], where["worker"]
        assert ingest_node != worker_node
        assert where["nodes"][ingest_node].get("ingest", 0) > 0
        assert where["nodes"][worker_node].get("model", 0) > 0

        kill_matching(f"node_manager_port={node_manager_port}")  # the second node's raylet
        before = captions()
        wait_until(lambda: captions() >= before + 3, 120, "captions after the node loss")
        after = placement(address, env)
        assert after["ingest"] == worker_node  # restarted on the remaining node
        assert len(after["nodes"]) == 1

        driver.send_signal(signal.SIGINT)  # Ctrl-C: drain, final status, exit 0
        assert driver.wait(timeout=90) == 0
        assert client.status("cam").state == "stopped"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        kill_matching(temp_dir)
        kill_matching(f"node_manager_port={node_manager_port}")
        kill_matching(f"gcs_server.*--gcs_server_port={port}")
