"""Redis connections from a URL, with the project's retry, timeout and health-check policy.

The URL carries everything deployment-specific: `redis://[user:password@]host:port/db`,
`rediss://...` for TLS (query options such as `ssl_ca_certs=/path/ca.pem`,
`ssl_cert_reqs=required|optional|none`, `ssl_certfile`, `ssl_keyfile` are passed to redis-py),
`unix:///path/redis.sock?db=0`. Passwords and ACL users come from the URL only.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# Errors that mean "Redis is unreachable right now", as opposed to a command being refused.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

SOCKET_TIMEOUT_S = 5.0
# Blocking reads (XREAD/XREADGROUP BLOCK, BLPOP) stay well below the socket timeout, otherwise
# redis-py takes the wait for a dead socket and retries it (a 7 s XREAD BLOCK then surfaced
# as a TimeoutError only after ~58 s).
MAX_BLOCK_S = 2.0


def connect(
    url: str,
    *,
    retries: int = 3,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    connect_timeout: float = SOCKET_TIMEOUT_S,
    health_check_interval: int = 30,
    client_name: str | None = None,
    decode_responses: bool = True,
) -> redis.Redis:
    """A redis-py client for `url`, returning str values (bytes with `decode_responses=False`,
    for binary values such as pictures).

    Retries connection errors and timeouts `retries` times with exponential backoff and jitter
    (10 ms up to 1 s); a command the server refuses is never retried. `health_check_interval`
    PINGs a connection idle for that long before reuse, so a server restart is noticed before a
    command is lost on a dead socket. Connecting is lazy: nothing is sent until the first command.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}: use redis://, rediss:// or unix://")
    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        # A producer may write any bytes; a decode error would make the entry unreadable and
        # block the intake on every retry, so bad bytes become U+FFFD and fail validation.
        encoding_errors="replace",
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.01), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=health_check_interval,
        client_name=client_name,
    )


def block_ms(seconds: float) -> int:
    """A BLOCK/timeout argument in ms, capped at MAX_BLOCK_S (never 0, which blocks forever)."""
    return max(1, int(min(seconds, MAX_BLOCK_S) * 1000))


def describe_redis_error(url: str, exc: BaseException) -> str:
    """One line for an unreachable or refusing Redis, naming the server (never the password)."""
    parts = urlsplit(url)
    where = parts.path if parts.scheme == "unix" else f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return f"Redis at {where} refused the credentials in the URL ({exc})"
    if isinstance(exc, redis.ResponseError) and "NOPERM" in str(exc):
        return f"Redis at {where}: the URL's user lacks a permission ({exc})"
    return f"Redis at {where} is unreachable ({exc})"


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """PING once with the URL's credentials, no retries; redis-py's error if that fails
    (`describe_redis_error` words it)."""
    client = connect(url, retries=0, socket_timeout=timeout, connect_timeout=timeout)
    try:
        client.ping()
    finally:
        client.close()


class Outage:
    """One component's view of Redis outages: a log line when an outage starts and one when it
    ends (never one per retry), and the backoff to wait before the next try.

    >>> outage = Outage("question intake", log)
    >>> try: work(); outage.ended()
    ... except UNREACHABLE as exc: stop.wait(outage.failed(exc))
    """

    def __init__(self, what: str, logger: logging.Logger, *, base: float = 0.2, cap: float = 5.0,
                 level: int = logging.WARNING) -> None:
        self.what, self.log, self.level = what, logger, level
        self.backoff = ExponentialWithJitterBackoff(cap=cap, base=base)
        self.since: float | None = None  # time.monotonic() of the first failure of this outage
        self.failures = 0
        self.outages = 0  # how many ended so far

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed try; returns the seconds to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.log(self.level, "%s: Redis unreachable, retrying until it is back (%s)", self.what, exc)
        self.failures += 1
        return self.backoff.compute(self.failures)

    def ended(self) -> float | None:
        """Record a success; returns the outage's length in seconds if one just ended."""
        if self.since is None:
            return None
        seconds = time.monotonic() - self.since
        self.since, self.failures = None, 0
        self.outages += 1
        self.log.log(self.level, "%s: Redis reachable again after %.1f s", self.what, seconds)
        return seconds
