"""One real local Ray for the session (2 CPUs, no dashboard)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray

from pipeline.ray_session import LOCAL_RAY_SYSTEM_CONFIG


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="slowfast-tests",
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield
    ray.shutdown()
