"""Real Redis for tests: one EmbeddedRedis per session, a clean database per test.

`redis_server`: the session's server (EmbeddedRedis). `redis_url`: a URL to a database that
is empty when the test starts (databases 1-15 in turn, FLUSHDB'd first), so tests do not
see each other's keys and need no cleanup. Tests that stop, restart or reconfigure a server
start their own EmbeddedRedis instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from connectors.embedded import EmbeddedRedis
from connectors.redis_conn import connect

__all__ = ["redis_server", "redis_url"]

_databases = itertools.cycle(range(1, 16))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_databases)}"
    client = connect(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url
