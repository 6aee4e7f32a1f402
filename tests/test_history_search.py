"""Search over the history Redis holds, on a real Redis: the index the publisher keeps in the
window's transaction, ranking and filters, retention (trimming, TTL, removal, a restart with
AOF), hostile input, and the same search through the client, the CLI and the HTTP API."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from connectors.client import SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.publisher import Publisher
from connectors.redis_conn import connect
from connectors.redis_schema import (
    DEFAULT_KEYS as K, Answer, AnswerKind, EntryKind, StreamInfo, Summary, SummaryKind,
)
from connectors.search import (
    HEAD, HOUR_S, PAIR_FIELD, PAIR_POSTING, POSTING, HOUR_STATS, TAIL_FIELD, Pair, SearchRequest, parse_query,
    postings_of, tail_field,
)
from pipeline.cli import app as cli_app
from pipeline.pictures import window_picture
from tests.support.records import make_caption, make_event

# Captions in the synthetic world's grammar: which say "red circle", which say it moving left,
# and one with a red triangle and a blue circle (both words, not the phrase).
TEXTS = [
    "a red circle moves right.",                                   # 0
    "a yellow square moves down.",                                 # 1
    "a red triangle moves down and a blue circle moves up.",      # 2
    "a red circle moves left and a blue square stays still.",     # 3
    "a green square moves left.",                                  # 4
    "a red circle moves left.",                                    # 5
    "a white triangle stays still and a red circle moves right.",  # 6
    "a blue circle moves left.",                                   # 7
]
NOW = time.time()


def publish(redis_url: str, sid: str = "cam1", texts=TEXTS, *, wall0: float = NOW - 3600, step: float = 60.0,
            events_on=(), with_pictures: bool = False, **publisher) -> StreamInfo:
    """Window i captioned texts[i], its capture ending at wall0 + i * step; events on `events_on`."""
    with Publisher(redis_url, **publisher) as pub:
        info = pub.register_stream(StreamInfo(id=sid, source="file:///clip.mp4"))
        for w, text in enumerate(texts):
            caption = make_caption(w, stream=sid, run=info.run, text=text, wall_end=wall0 + w * step)
            events = [make_event(w, stream=sid, run=info.run, question="Is there a red circle?", text="Yes",
                                 wall_end=wall0 + w * step)] if w in events_on else []
            answers = [Answer(question_id="rc", stream=sid, question="Is there a red circle?", kind=AnswerKind.STANDING,
                              window=w, text="Yes" if "red circle" in text else "No")]
            picture = window_picture(np.full((64, 64, 3), 40 * (w % 6), np.uint8), caption) if with_pictures else None
            pub.publish_window(caption, answers, events, frame=picture)
    return info


def windows(hits) -> list[int]:
    return [h.window for h in hits]


def test_words_phrases_prefixes_rank_and_filter(redis_url):
    now = time.time()  # `since` counts back from the clock, not from when this module was imported
    publish(redis_url, "cam1", wall0=now - 3600)
    publish(redis_url, "cam2", ["a red circle moves left."], wall0=now - 60)
    sfs = SlowFastClient(redis_url)

    # Both words: every caption holding them; the phrase as written first (the shortest text
    # first among those), then the others; equal scores newest first.
    hits = sfs.search("red circle", kinds=["caption"], streams=["cam1"]).hits
    assert sorted(windows(hits)) == [w for w, t in enumerate(TEXTS) if "red" in t.split() and "circle" in t]
    assert windows(hits) == [5, 0, 6, 3, 2]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].score == hits[1].score  # same text length and words: the newer wins
    assert hits[0].wall_time > hits[1].wall_time

    # A phrase finds only the captions that say it.
    phrase = sfs.search('"red circle moves left"', kinds=["caption"]).hits
    assert {(h.stream, h.window) for h in phrase} == {("cam1", 3), ("cam1", 5), ("cam2", 0)}
    assert phrase[0].stream == "cam2"  # same score as cam1's window 5 (the same text), and newer

    # Prefixes, stopword gaps in a phrase, and no match at all.
    assert sorted(windows(sfs.search("circ*", kinds=["caption"], streams=["cam1"]).hits)) == [0, 2, 3, 5, 6, 7]
    assert windows(sfs.search('"square stays still"', streams=["cam1"]).hits) == [3]
    assert windows(sfs.search('"circle moves the left"', streams=["cam1"], kinds=["caption"]).hits) == []
    assert sfs.search("purple hexagon").hits == []

    # Filters: streams, kinds, time. Stream ids and times are never words.
    assert {h.stream for h in sfs.search("red circle", kinds=["caption"]).hits} == {"cam1", "cam2"}
    assert {h.stream for h in sfs.search("red circle", streams=["cam2"]).hits} == {"cam2"}
    recent = sfs.search("red circle", kinds=["caption"], since="10m").hits
    assert [(h.stream, h.window) for h in recent] == [("cam2", 0)]
    ranged = sfs.search("circle", kinds=["caption"], streams=["cam1"], start=now - 3600 + 150, end=now - 3600 + 330)
    assert sorted(windows(ranged.hits)) == [3, 5]
    answers = sfs.search("yes", kinds=["answer"], streams=["cam1"]).hits  # answers match their text, not question
    assert {h.kind for h in answers} == {EntryKind.ANSWER} and sorted(windows(answers)) == [0, 3, 5, 6]
    assert all(h.question == "Is there a red circle?" for h in answers)
    assert sfs.search("cam1").hits == []


def test_a_phrase_reads_its_word_pairs_and_an_index_begun_without_pairs_reads_its_words(redis_url):
    """A phrase's words come from its pairs' postings: with the postings of the word "moves" gone
    from the index (its head, which plans the search, kept), the phrase is still found. An hour begun by an index without pairs
    (its `#` field the older 24 bytes, no pair buckets) answers from the words instead."""
    publish(redis_url, "cam1")
    publish(redis_url, "cam2")
    raw = connect(redis_url, decode_responses=False)
    for key in raw.keys(b"*{cam1}:ix:caption:*"):
        if raw.type(key) == b"hash":
            raw.hdel(key, b"moves", tail_field("moves").encode())
    for key in raw.keys(b"*{cam2}:ix:caption:*"):
        if raw.type(key) == b"hash":
            stats = raw.hget(key, b"#")
            assert len(stats) == HOUR_STATS.size
            raw.hset(key, b"#", stats[:24])
            raw.hdel(key, *[f for f in raw.hkeys(key) if f.lstrip(TAIL_FIELD.encode()).startswith(PAIR_FIELD.encode())])
    sfs = SlowFastClient(redis_url)
    for query in ('"red circle moves left"', '"circle moves left"'):
        hits = sfs.search(query, kinds=["caption"]).hits
        expected = {w for w, t in enumerate(TEXTS) if query.strip('"') in t}
        assert {(h.stream, h.window) for h in hits} == {(s, w) for s in ("cam1", "cam2") for w in expected}, query
        scores = {(h.stream, h.window): h.score for h in hits}
        assert all(scores[("cam1", w)] == scores[("cam2", w)] for w in expected)  # the same BM25 either way
    assert sfs.search("moves", kinds=["caption"], streams=["cam1"]).hits == []  # its postings really are gone


def test_an_hour_written_before_tails_is_continued_and_read_the_same(redis_url):
    """Postings written before tails are all in their fields; an hour like that, continued by
    this index (new records in tails), answers as one written with tails from the start."""
    publish(redis_url, "cam2")  # the reference: tails from the start
    info = publish(redis_url, "cam1", TEXTS[:5])
    raw = connect(redis_url, decode_responses=False)
    for key in raw.keys(b"*{cam1}:ix:caption:*"):  # fold each tail into its field, as before tails
        if raw.type(key) == b"hash":
            for tail in [f for f in raw.hkeys(key) if f.startswith(TAIL_FIELD.encode())]:
                raw.hset(key, tail[1:], (raw.hget(key, tail[1:]) or b"") + raw.hget(key, tail))
                raw.hdel(key, tail)
            assert not any(f.startswith(TAIL_FIELD.encode()) for f in raw.hkeys(key))
    with Publisher(redis_url) as pub:
        for w in range(5, len(TEXTS)):
            pub.publish_window(make_caption(w, stream="cam1", run=info.run, text=TEXTS[w], wall_end=NOW - 3600 + w * 60))
    sfs = SlowFastClient(redis_url)
    for query in ("red circle", '"red circle moves left"', "circ*", "left"):
        hits = {sid: [(h.window, h.score) for h in sfs.search(query, kinds=["caption"], streams=[sid]).hits]
                for sid in ("cam1", "cam2")}
        assert hits["cam1"] == hits["cam2"] and hits["cam1"], query


def test_hits_carry_times_and_pictures_while_redis_holds_them(redis_url):
    info = publish(redis_url, "cam1", events_on=(0, 5), with_pictures=True)
    sfs = SlowFastClient(redis_url)
    hits = {(h.kind, h.window): h for h in sfs.search("red circle", streams=["cam1"], limit=50).hits}
    caption = hits[(EntryKind.CAPTION, 5)]
    assert caption.entry_id == make_caption(5, run=info.run).entry_id
    assert (caption.start, caption.end) == (20.0, 35.75) and caption.wall_time == pytest.approx(NOW - 3600 + 300)
    # Window 5 had an event: its snapshot is held; window 7 is the newest: the latest picture.
    assert caption.picture_key == K.snapshots("cam1") and caption.picture_id == caption.entry_id
    assert sfs.snapshot("cam1", caption.picture_id)
    assert hits[(EntryKind.EVENT, 5)].picture_id == caption.entry_id
    (newest,) = sfs.search('"blue circle moves left"', kinds=["caption"]).hits
    assert newest.window == 7 and newest.picture_key == K.frame("cam1") and newest.picture_id == newest.entry_id
    assert hits[(EntryKind.CAPTION, 3)].picture_key is None  # no picture of that window is kept
    assert hits[(EntryKind.EVENT, 0)].text == "Yes" and hits[(EntryKind.EVENT, 0)].question


def test_summaries_are_searched_and_a_retried_window_is_indexed_once(redis_url):
    info = publish(redis_url, "cam1", TEXTS[:3])
    with Publisher(redis_url) as pub:
        summary = Summary(stream="cam1", run=info.run, seq=0, kind=SummaryKind.ROLLING, first_window=0,
                          last_window=2, start=0, end=23.75, text="A red circle and then a yellow square.")
        pub.publish_summary(summary)
        again = make_caption(2, stream="cam1", run=info.run, text=TEXTS[2], wall_end=NOW)
        pub.publish_window(again)  # a retry of window 2: a duplicate, never a second posting
    (hit,) = SlowFastClient(redis_url).search("yellow square", kinds=["summary"]).hits
    assert (hit.kind, hit.first_window, hit.window) == (EntryKind.SUMMARY, 0, 2)
    assert postings_held(connect(redis_url), "cam1", "red") == 2
    assert windows(SlowFastClient(redis_url).search("triangle", kinds=["caption"]).hits) == [2]


def postings_held(r, sid: str, term: str) -> int:
    """The term's caption postings over every hour the index holds."""
    hours = r.zrange(K.index_hours(sid, EntryKind.CAPTION), 0, -1)
    return sum(r.hstrlen(K.index_hour(sid, EntryKind.CAPTION, h), field_) for h in hours
               for field_ in (term, tail_field(term))) // POSTING.itemsize


def test_trimmed_expired_and_removed_entries_leave_no_hits(redis_url):
    # Captions a minute apart: an hour's 60, the next hour's 60, then 10 in a third hour.
    texts = [f"a red circle moves left number{w}" for w in range(130)]
    first_hour = int(NOW // HOUR_S) - 3
    publish(redis_url, "cam1", texts, wall0=first_hour * HOUR_S, history_len=40)
    r, sfs = connect(redis_url), SlowFastClient(redis_url)
    held = [int(fields["data"].split('"window":')[1].split(",")[0]) for _, fields in r.xrange(K.captions("cam1"))]
    hits = sfs.search("red circle", kinds=["caption"], limit=500).hits
    assert sorted(windows(hits)) == held and len(held) < 60  # exactly what MAXLEN ~ kept
    assert sfs.search("number3", kinds=["caption"]).hits == []  # trimmed long ago
    # The first hour, all trimmed, went from the index as the third began; the others are left.
    assert min(held) >= 60
    assert r.zrange(K.index_hours("cam1", EntryKind.CAPTION), 0, -1) == [str(first_hour + 1), str(first_hour + 2)]
    assert not r.exists(K.index_hour("cam1", EntryKind.CAPTION, first_hour))
    assert postings_held(r, "cam1", "red") == 70
    # Each term's head, in a field of its own, counts its postings in the hour and bounds them.
    raw = connect(redis_url, decode_responses=False)
    for hour in (first_hour + 1, first_hour + 2):
        key = K.index_hour("cam1", EntryKind.CAPTION, hour)
        count, *pairs = HEAD.unpack(raw.hget(key, "^red"))
        records = np.frombuffer((raw.hget(key, "red") or b"") + raw.hget(key, tail_field("red")), POSTING)
        assert count == len(records) == (60 if hour == first_hour + 1 else 10)
        assert all(any(rec["tf"] <= tf and rec["dl"] >= dl for tf, dl in zip(pairs[0::2], pairs[1::2])) for rec in records)

    # A stream nobody writes any more: its entries and its index expire together.
    publish(redis_url, "brief", TEXTS[:2], key_ttl_s=1)
    assert sfs.search("red circle", streams=["brief"]).hits
    time.sleep(2.2)
    assert sfs.search("red circle", streams=["brief"]).hits == []
    assert r.keys("sfs:{brief}:*") == []

    # Removed: every key of its index gets the removal TTL; forgotten: deleted at once.
    with Publisher(redis_url) as pub:
        pub.unregister_stream("cam1")
        hour = K.index_hour("cam1", EntryKind.CAPTION, first_hour + 1)
        assert 0 < r.ttl(hour) <= pub.removed_ttl_s
        pub.forget_stream("cam1")
    assert r.keys("sfs:{cam1}:*") == []


def test_search_after_a_redis_restart_with_aof(tmp_path):
    with EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        publish(server.url, "cam1", events_on=(5,))
        before = SlowFastClient(server.url).search("red circle", limit=50).hits
        server.kill()
        server.stop()
        server.start()
        after = SlowFastClient(server.url).search("red circle", limit=50).hits
        assert [(h.kind, h.entry_id, h.score) for h in after] == [(h.kind, h.entry_id, h.score) for h in before]
        assert len(before) > 5


HOSTILE = ['"', '"""', "*", "red*circle*", "(red OR circle) AND -blue", "{cam1}:*", "red\x00circle", "\\", "%s %n",
           "-- DROP", "[a-z]*", "é*", "🟥 circle"]


def test_hostile_queries_are_one_line_errors_or_plain_results(redis_url):
    publish(redis_url, "cam1")
    sfs = SlowFastClient(redis_url)
    for query in HOSTILE:
        try:
            sfs.search(query)
        except ValueError as exc:
            assert "\n" not in str(exc), query
    with pytest.raises(ValueError, match="no words"):
        sfs.search("")
    with pytest.raises(ValueError, match="no words"):
        sfs.search("the a and")
    with pytest.raises(ValueError, match="limit is 2000"):
        sfs.search("red " * 25_000)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        sfs.search(b"red \xff\xfe circle".decode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match="invalid stream id"):
        sfs.search("red", streams=["bad id"])
    with pytest.raises(ValueError, match="invalid duration"):
        sfs.search("red", since="yesterday")
    with pytest.raises(ValueError, match="not both"):
        sfs.search("red", since="1h", start="14:00")
    with pytest.raises(ValueError, match="invalid kind"):
        sfs.search("red", kinds=["frame"])
    assert windows(sfs.search("red*circle*", kinds=["caption"], streams=["cam1"]).hits)  # "red" then "circle*"


def test_cli_search_and_its_errors(redis_url):
    publish(redis_url, "cam1")
    runner = CliRunner()
    done = runner.invoke(cli_app, ["search", "red circle", "--redis-url", redis_url, "--kind", "caption", "--json"])
    assert done.exit_code == 0, done.output
    body = json.loads(done.stdout)
    assert [h["window"] for h in body["hits"]] == [5, 0, 6, 3, 2] and body["total"] == 5
    text = runner.invoke(cli_app, ["search", '"red circle moves left"', "--redis-url", redis_url, "--stream", "cam1",
                                   "--kind", "caption"])
    assert text.exit_code == 0 and "caption of window 5:" in text.stdout and "2 of 2 hits" in text.stdout
    for args, message in [(["search", "!!!"], "no words"), (["search", "x" * 100_000], "the limit is 2000"),
                          (["search", "red", "--since", "soon"], "invalid duration"),
                          (["search", "red", "--kind", "frames"], "invalid kind"),
                          (["search", "red", "--from", "noon"], "invalid time")]:
        failed = runner.invoke(cli_app, [*args, "--redis-url", redis_url])
        assert failed.exit_code == 2, (args, failed.output)
        assert failed.stderr.count("\n") == 1 and message in failed.stderr, failed.stderr


def test_a_search_that_stops_early_says_its_total_is_a_floor(redis_url, web_server):
    # The same caption an hour apart: the two newest hours fill a page of two, and no older hour
    # can beat them (equal scores, older), so reading stops there.
    first_hour = int(NOW // HOUR_S) - 6
    publish(redis_url, "cam1", ["a red circle moves left."] * 6, wall0=first_hour * HOUR_S + 60, step=HOUR_S)
    sfs = SlowFastClient(redis_url)
    early = sfs.search("red circle", kinds=["caption"], limit=2)
    assert (windows(early.hits), early.total, early.complete) == ([5, 4], 2, False)
    full = sfs.search("red circle", kinds=["caption"], limit=10)
    assert (len(full.hits), full.total, full.complete) == (6, 6, True)
    args = ["search", "red circle", "--redis-url", redis_url, "--kind", "caption", "--limit", "2"]
    assert "2 of at least 2 hits" in CliRunner().invoke(cli_app, args).stdout
    assert json.loads(CliRunner().invoke(cli_app, [*args, "--json"]).stdout)["complete"] is False
    api = httpx.Client(base_url=web_server.url, timeout=10)
    body = api.get("/api/search", params={"q": "red circle", "kind": "caption", "limit": 2}).json()
    assert (body["total"], body["complete"]) == (2, False), body


def test_api_search_is_the_client_search(redis_url, web_server):
    publish(redis_url, "cam1", events_on=(5,), with_pictures=True)
    api = httpx.Client(base_url=web_server.url, timeout=10)
    body = api.get("/api/search", params={"q": "red circle", "stream": "cam1", "limit": 50}).json()
    expected = SlowFastClient(redis_url).search("red circle", streams=["cam1"], limit=50)
    assert [(h["kind"], h["entry_id"]) for h in body["hits"]] == [(h.kind, h.entry_id) for h in expected.hits]
    assert body["total"] == expected.total
    with_picture = next(h for h in body["hits"] if h["kind"] == "caption" and h["window"] == 5)
    picture = api.get(with_picture["picture_url"])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
    for params, message in [({"q": "*"}, "no words"), ({"q": "red", "since": "later"}, "invalid duration"),
                            ({"q": "x" * 10_000}, "limit is 2000"), ({"q": "red", "kind": "x"}, "invalid kind")]:
        failed = api.get("/api/search", params=params)
        assert failed.status_code == 422 and message in failed.json()["detail"], failed.text
    assert api.get("/api/search", params={"q": "red", "stream": "no such"}).status_code == 422
    assert api.get("/api/search?q=red%FF%FEcircle").status_code in (200, 422)


def test_parse_query_and_postings_units():
    parsed = parse_query('red "moves to the left" circ*')
    assert parsed.terms == ("red", "moves", "left") and parsed.prefixes == ("circ",)
    assert parsed.phrases == (((0, "moves"), (3, "left")),)
    entry = postings_of("A red circle moves; the red circle!", "1700000000000-3", 7205.25)
    assert entry.length == 7 and set(entry.terms) == {"red", "circle", "moves"}
    record = np.frombuffer(entry.terms["red"], dtype=POSTING)[0]
    assert (int(record["id"]), record["tf"], record["dl"], record["us"]) == (1700000000000 << 16 | 3, 2, 7, 5_250_000)
    assert int(record["mask"]) == (1 << 1) | (1 << 5)
    # Pairs of consecutive indexed words, the gap counting the stopword between: each pair once,
    # with both words' counts and the first word's positions, in the bucket its hash names.
    pairs = {int(r["pair"]): (r, field) for field, blob in entry.pairs.items()
             for r in np.frombuffer(blob, dtype=PAIR_POSTING)}
    assert len(pairs) == 3
    for pair, counts, mask in [(Pair("red", 1, "circle"), (2, 2), (1 << 1) | (1 << 5)),
                               (Pair("circle", 1, "moves"), (2, 1), 1 << 2), (Pair("moves", 2, "red"), (1, 2), 1 << 3)]:
        found, field = pairs[pair.hash]
        assert field == pair.field and (found["tf"] >> 4, found["tf"] & 15) == counts and int(found["mask"]) == mask
        assert (int(found["id"]), found["dl"]) == (1700000000000 << 16 | 3, 7)
    assert SearchRequest.build("red", since="2h", now=10_000.0).start == 10_000.0 - 7200


def test_event_spans_join_a_questions_windows_in_a_row():
    from connectors.redis_schema import Event
    from pipeline.history import event_spans

    def fired(window: int, question_id: str = "rc") -> tuple[str, Event]:
        return f"{1000 + window}-0", Event(stream="cam1", window=window, run=1000, question_id=question_id,
                                           question=f"{question_id}?", text="Yes", trigger="p_yes>0.5",
                                           start=4.0 * window, end=4.0 * window + 15.75, wall_end=100.0 + window)

    spans = event_spans([fired(1), fired(2), fired(3), fired(6), fired(2, "van")], {})
    assert [(s.question_id, s.first_window, s.last_window, s.windows) for s in spans] == \
        [("rc", 1, 3, 3), ("van", 2, 2, 1), ("rc", 6, 6, 1)]
    assert (spans[0].opened, spans[0].closed, spans[0].start, spans[0].end) == (101.0, 103.0, 4.0, 27.75)
