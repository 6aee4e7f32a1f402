"""Event notifications: each opening and closing of an event is POSTed to the webhooks of its
stream and of its standing question, away from the model's path. No Ray, no model.

The output processor hands each record to `Notifier.event`, which only queues it: every sink
has its own sender thread that delivers its queue in order, so a slow or dead receiver holds
back only its own later deliveries, never a caption. A delivery is the event's JSON, signed
(HMAC-SHA256 of the body with the sink's secret) and carrying an idempotency key that every
retry repeats. Failures are retried with exponential backoff up to the sink's `max_attempts`;
one that is given up on, refused, or still due when the pipeline stops is written down
(`write_down`: a Redis record) and logged, never dropped silently.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from connectors.redis_schema import Event, Undelivered
from connectors.redact import redact_uri

from .config import NotifySink, StandingQuestion, StreamConfig

log = logging.getLogger("slowfast.notify")

SIGNATURE_HEADER = "X-Slowfast-Signature"  # sha256=<hex HMAC-SHA256 of the body under the sink's secret>
IDEMPOTENCY_HEADER = "Idempotency-Key"  # the same on every attempt of one delivery
ATTEMPT_HEADER = "X-Slowfast-Attempt"  # 1, 2, ...
BACKOFF_S = 0.5  # wait after the first failed attempt; doubles after each one
MAX_BACKOFF_S = 30.0
# Answers worth another attempt; any other 4xx (a bad signature, a wrong path) never improves.
RETRY_STATUS = {408, 425, 429}


def signature(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def idempotency_key(event: Event) -> str:
    return f"{event.stream}:{event.event_id}:{event.phase}"


class DeliveryError(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would turn the POST into a GET without its body."""

    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> None:
    """POST `body`; returns on a 2xx answer, else raises DeliveryError saying whether to retry."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code} {exc.reason}", exc.code >= 500 or exc.code in RETRY_STATUS) from None
    except urllib.error.URLError as exc:
        raise DeliveryError(f"{type(exc.reason).__name__}: {exc.reason}", True) from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, malformed answers
        raise DeliveryError(f"{type(exc).__name__}: {exc}", True) from None


@dataclass
class Delivery:
    event: Event
    body: bytes
    key: str
    attempts: int = 0
    error: str = ""


@dataclass
class DeliveryStats:
    """One stream's deliveries, for its status."""

    delivered: int = 0
    failed: int = 0  # given up on and written down
    pending: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


SinkKey = tuple[str, str | None, float, int]


def sink_key(sink: NotifySink) -> SinkKey:
    secret = sink.secret.get_secret_value() if sink.secret is not None else None
    return sink.webhook, secret, sink.timeout_s, sink.max_attempts


class _Sender:
    """One sink's queue and the thread that delivers it, oldest first."""

    def __init__(self, notifier: Notifier, key: SinkKey):
        self.notifier = notifier
        self.url, self.secret, self.timeout_s, self.max_attempts = key
        self.queue: deque[Delivery] = deque()
        self.thread = threading.Thread(target=self._run, name=f"notify-{redact_uri(self.url)}", daemon=True)

    def _run(self) -> None:
        n = self.notifier
        while True:
            with n.cond:
                while not self.queue and not n.closing:
                    n.cond.wait()
                if not self.queue or n.abandon:
                    return  # stopping: what is left, close() writes down
                delivery = self.queue[0]
            try:
                self._attempt(delivery)
            except DeliveryError as exc:
                if self._failed(delivery, exc):
                    n.give_up(self, delivery)
                continue
            with n.cond:
                if self.queue and self.queue[0] is delivery:
                    self.queue.popleft()
                    n.stats_of(delivery).delivered += 1
                    n.cond.notify_all()

    def _attempt(self, delivery: Delivery) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "slowfast-stream",
                   IDEMPOTENCY_HEADER: delivery.key, ATTEMPT_HEADER: str(delivery.attempts + 1)}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = signature(self.secret, delivery.body)
        post(self.url, delivery.body, headers, self.timeout_s)

    def _failed(self, delivery: Delivery, exc: DeliveryError) -> bool:
        """Count a failed attempt and wait out its backoff; True when it is time to give up."""
        n = self.notifier
        with n.cond:
            delivery.attempts += 1
            delivery.error = str(exc)
            stats = n.stats_of(delivery)
            stats.last_error, stats.last_error_at = f"{redact_uri(self.url)}: {exc}", time.time()
            if not exc.retry or delivery.attempts >= self.max_attempts:
                return True
            log.info("delivery %s to %s failed (attempt %d of %d): %s", delivery.key, redact_uri(self.url),
                     delivery.attempts, self.max_attempts, exc)
            wait_s = min(n.backoff_s * 2 ** (delivery.attempts - 1), n.max_backoff_s)
            n.cond.wait_for(lambda: n.abandon, timeout=wait_s)
        return False


class Notifier:
    """Every sink's sender, and each stream's delivery counts. `event` is the output
    processor's listener; `close` is the stop."""

    def __init__(self, write_down: Callable[[Undelivered], object] | None = None, *, backoff_s: float = BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S):
        self.write_down = write_down
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.cond = threading.Condition()
        self.senders: dict[SinkKey, _Sender] = {}
        self.stats: dict[str, DeliveryStats] = {}
        self.closing = False  # no new deliveries; the senders finish their queues
        self.abandon = False  # the senders stop after their current attempt

    def event(self, stream: StreamConfig, question: StandingQuestion, event: Event) -> None:
        """Queue the record for every sink of its stream and question (each sink once)."""
        keys = list(dict.fromkeys(sink_key(s) for s in [*stream.notify, *question.notify]))
        if not keys:
            return
        body = event.to_json().encode()
        refused = []
        with self.cond:
            self.stats.setdefault(event.stream, DeliveryStats())
            for key in keys:
                delivery = Delivery(event, body, idempotency_key(event))
                if self.closing:
                    delivery.error = "the pipeline was stopping"
                    refused.append((key[0], delivery))
                    continue
                sender = self.senders.get(key)
                if sender is None:
                    sender = self.senders[key] = _Sender(self, key)
                    sender.thread.start()
                sender.queue.append(delivery)
            self.cond.notify_all()
        for url, delivery in refused:
            self._write_down(url, delivery)

    def stats_of(self, delivery: Delivery) -> DeliveryStats:
        return self.stats.setdefault(delivery.event.stream, DeliveryStats())

    def stream_stats(self, stream: str) -> DeliveryStats:
        """A copy of the stream's counts, `pending` counted now."""
        with self.cond:
            stats = self.stats.get(stream, DeliveryStats())
            pending = sum(d.event.stream == stream for s in self.senders.values() for d in s.queue)
            return DeliveryStats(stats.delivered, stats.failed, pending, stats.last_error, stats.last_error_at)

    def give_up(self, sender: _Sender, delivery: Delivery) -> None:
        with self.cond:
            if not (sender.queue and sender.queue[0] is delivery):
                return  # close() took it already
            sender.queue.popleft()
            self.cond.notify_all()
        self._write_down(sender.url, delivery)

    def _write_down(self, url: str, delivery: Delivery) -> None:
        event = delivery.event
        with self.cond:
            self.stats_of(delivery).failed += 1
        record = Undelivered(stream=event.stream, event_id=event.event_id, phase=event.phase, sink=url,
                             idempotency_key=delivery.key, attempts=delivery.attempts, error=delivery.error,
                             event=event)
        log.warning("event %s (%s) of %s not delivered to %s after %d attempts: %s", event.event_id, event.phase,
                    event.stream, record.sink, delivery.attempts, delivery.error)
        if self.write_down is not None:
            try:
                self.write_down(record)
            except Exception:  # the log line above is then the only record
                log.exception("undelivered event %s of %s not written down", event.event_id, event.stream)

    def close(self, timeout_s: float) -> int:
        """Stop: deliver what can be delivered within `timeout_s` (retries included), then write
        down whatever is left. Returns how many deliveries were written down at this stop."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            senders = list(self.senders.values())
        for sender in senders:
            sender.thread.join(max(0.0, deadline - time.monotonic()))
        with self.cond:
            self.abandon = True
            self.cond.notify_all()
        for sender in senders:  # an attempt in flight ends within its timeout
            sender.thread.join(sender.timeout_s + 1.0)
        left: list[tuple[str, Delivery]] = []
        with self.cond:
            for sender in senders:
                left += [(sender.url, d) for d in sender.queue]
                sender.queue.clear()
        for url, delivery in left:
            delivery.error = f"still due at the stop ({delivery.error or 'not attempted'})"
            self._write_down(url, delivery)
        return len(left)
