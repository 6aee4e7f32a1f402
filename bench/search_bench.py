"""History search: its latency over a day of captions, the publishing cost of keeping the index,
and the Redis memory it adds, against the options it was chosen over (measured in the same run).

    .venv/bin/python -m bench.search_bench            # 30 streams x 24 h, a caption every 4 s (648 000)
    .venv/bin/python -m bench.search_bench --smoke    # seconds: shows it runs

Captions are the synthetic world's sentences plus 15-30 filler words drawn (Zipf) from 5 000,
about the length and vocabulary spread of a real model's captions. Rows:
  upkeep        ms per window published with the index against without (same Publisher, same Redis)
  memory        Redis memory of the index per caption (MEMORY USAGE of every index key) and of the
                captions themselves
  search        p50 / p99 over a query mix (words, a phrase, a prefix, time / stream / kind filters)
  scan          the same kind of query answered without an index: every caption read and matched
  rebuild       an in-process index rebuilt from Redis on start: every caption read and tokenised
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np

from bench.common import parse_args, percentile
from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.publisher import Publisher
from connectors.redis_conn import connect
from connectors.redis_schema import DEFAULT_KEYS as K, Caption, EntryKind, Event, StreamInfo, encode_entry
from connectors.search import INDEX_ENTRY, IndexedEntry, entry_text, index_commands, postings_of, words
from world.scenes import COLOURS, MOTIONS, SHAPES

FILLER = [f"w{i:04d}" for i in range(5000)]
QUERIES = [
    ("two words", dict(query="red circle")),
    ("rare word", dict(query="w4321")),
    ("phrase", dict(query='"red circle moves left"')),
    ("prefix", dict(query="tri*")),
    ("words, last 2 h", dict(query="blue square", since="2h")),
    ("words, one stream", dict(query="yellow triangle", streams=["cam007"])),
    ("words, events only", dict(query="green circle", kinds=["event"])),
]


class UnindexedPublisher(Publisher):
    """The publisher as it was before the index: the baseline of the upkeep row."""

    def _index(self, *args, **kwargs) -> None:
        return None


def caption_text(rng: np.random.Generator) -> str:
    objects = [f"a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} {rng.choice(list(MOTIONS))}"
               for _ in range(rng.integers(1, 3))]
    filler = " ".join(FILLER[min(int(i), len(FILLER) - 1)] for i in rng.zipf(1.3, rng.integers(15, 31)) - 1)
    return " and ".join(objects) + ". " + filler


def caption(sid: str, run: int, window: int, wall: float, text: str) -> Caption:
    return Caption(stream=sid, window=window, run=run, start=window * 4.0, end=window * 4.0 + 15.75,
                   wall_start=wall - 15.75, wall_end=wall, text=text, model="bench")


def upkeep_ms(url: str, windows: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median ms to publish a window (its caption, one transaction) without and with the index:
    the two publishers take turns window by window, so load on the machine hits both alike."""
    times: dict[type, list[float]] = {UnindexedPublisher: [], Publisher: []}
    pubs = {cls: cls(url, history_len=10 ** 7, maintain_interval_s=None) for cls in times}
    runs = {cls: pub.register_stream(StreamInfo(id=f"upkeep-{cls.__name__}", source="bench://")).run
            for cls, pub in pubs.items()}
    now = time.time()
    for w in range(windows):
        text = caption_text(rng)
        for cls in (list(pubs) if w % 2 else list(pubs)[::-1]):
            c = caption(f"upkeep-{cls.__name__}", runs[cls], w, now + w, text)
            started = time.perf_counter()
            pubs[cls].publish_window(c)
            times[cls].append((time.perf_counter() - started) * 1000)
    for cls, pub in pubs.items():
        pub.forget_stream(f"upkeep-{cls.__name__}")
        pub.close()
    return statistics.median(times[UnindexedPublisher]), statistics.median(times[Publisher])


def fill(url: str, streams: int, per_stream: int, every_s: float, rng: np.random.Generator) -> float:
    """Captions and their index as the publisher writes them, in pipelines (the day's history,
    quickly). Returns the seconds it took."""
    redis = connect(url)
    script = redis.register_script(INDEX_ENTRY)
    start = time.time() - per_stream * every_s
    started = time.perf_counter()
    for s in range(streams):
        sid = f"cam{s:03d}"
        run = int(start * 1000)
        redis.hset(K.registry, sid, StreamInfo(id=sid, source="bench://", run=run).to_json())
        pipe = redis.pipeline(transaction=False)
        for w in range(per_stream):
            c = caption(sid, run, w, start + w * every_s, caption_text(rng))
            pipe.xadd(K.captions(sid), encode_entry(c), id=c.entry_id)
            index_commands(script, pipe, K, sid, IndexedEntry(EntryKind.CAPTION, c.entry_id, c.text, c.wall_end),
                           7 * 24 * 3600)
            if w % 50 == 0:  # an event now and then, as standing questions raise them
                event = Event(stream=sid, window=w, run=run, question_id="q", question="Is there a green circle?",
                              text="Yes", trigger="p_yes>0.5", start=c.start, end=c.end, wall_end=c.wall_end)
                pipe.xadd(K.events(sid), encode_entry(event), id=c.entry_id)
                index_commands(script, pipe, K, sid, IndexedEntry(EntryKind.EVENT, c.entry_id,
                                                                  entry_text(EntryKind.EVENT, event), c.wall_end),
                               7 * 24 * 3600)
            if len(pipe) >= 2000:
                pipe.execute()
        pipe.execute()
    redis.close()
    return time.perf_counter() - started


def index_bytes(url: str) -> tuple[int, int, int]:
    """(bytes of index keys, bytes of caption streams, index keys)."""
    redis = connect(url)
    index, captions, count = 0, 0, 0
    keys = list(redis.scan_iter(match="sfs:{*}:*", count=5000))
    for start in range(0, len(keys), 5000):
        chunk = keys[start: start + 5000]
        pipe = redis.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(chunk, pipe.execute()):
            if ":ix:" in key:
                index, count = index + (size or 0), count + 1
            elif key.endswith(":captions"):
                captions += size or 0
    redis.close()
    return index, captions, count


def timed(run, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        out.append((time.perf_counter() - started) * 1000)
    return out


def scan_all(client: SlowFastClient, streams: Sequence[str], tokenize: bool) -> int:
    """Every caption read back (and tokenised, or matched against "red circle")."""
    found = 0
    for sid in streams:
        after = "-"
        while batch := client.redis.xrange(K.captions(sid), min=after, count=5000):
            for entry_id, fields in batch:
                text = Caption.model_validate_json(fields["data"]).text
                if tokenize:
                    postings_of(text, entry_id, 0.0)
                else:
                    found += {"red", "circle"} <= set(words(text))
            after = f"({batch[-1][0]}"
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between a stream's captions")
    parser.add_argument("--upkeep-windows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=30, help="runs of each query")
    parser.add_argument("--scan-streams", type=int, default=30, help="streams the scan/rebuild rows read")
    args = parse_args(parser, argv, dict(streams=2, hours=0.1, upkeep_windows=40, repeat=3, scan_streams=2))
    rng = np.random.default_rng(0)
    per_stream = int(args.hours * 3600 / args.every)
    with EmbeddedRedis() as server:
        url = server.url
        plain, indexed = upkeep_ms(url, args.upkeep_windows, rng)
        redis = connect(url)
        filled_s = fill(url, args.streams, per_stream, args.every, rng)
        total = args.streams * per_stream
        print(f"history: {args.streams} streams x {args.hours:g} h, a caption every {args.every:g} s: {total} captions "
              f"(filled in {filled_s:.0f} s); redis {redis.info('server')['redis_version']}")
        print(f"upkeep: {indexed:.2f} ms per window with the index, {plain:.2f} ms without (medians): "
              f"+{indexed - plain:.2f} ms ({indexed / plain:.2f}x)")
        index, captions, keys = index_bytes(url)
        print(f"memory: index {index / total:.0f} B per caption ({index / 2 ** 20:.1f} MiB in {keys} keys), "
              f"captions {captions / total:.0f} B per caption; index / captions {index / max(captions, 1):.2f}x")
        client = SlowFastClient(url, socket_timeout=60)
        latencies: list[float] = []
        for name, query in QUERIES:
            hits = client.search(limit=20, **query)
            times = timed(lambda q=query: client.search(limit=20, **q), args.repeat)
            latencies += times
            total = f"{hits.total}" if hits.complete else f"{hits.total}+ (stopped early)"
            print(f"  {name:<20} {statistics.median(times):7.1f} ms median  {len(hits.hits):3d} of {total} hits")
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"search: p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(latencies)} queries")
        streams = [f"cam{s:03d}" for s in range(min(args.scan_streams, args.streams))]
        share = len(streams) / args.streams
        (scan,) = timed(lambda: scan_all(client, streams, tokenize=False), 1)
        (rebuild,) = timed(lambda: scan_all(client, streams, tokenize=True), 1)
        scan, rebuild = scan / share, rebuild / share
        print(f"scan without index: {scan:.0f} ms per query ({scan / p50:.0f}x the indexed p50)")
        print(f"rebuild in process on start: {rebuild / 1000:.1f} s to read and tokenise every caption "
              f"(before the first query of each process)")
        client.close()
        redis.close()


if __name__ == "__main__":
    main()
