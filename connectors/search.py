"""Search over every caption, answer, event and summary Redis holds: an inverted index kept in
Redis itself, written in the same MULTI/EXEC as the entries it indexes (plain Redis 7 / Valkey,
no modules).

Layout, per stream and entry kind (`caption`, `answer`, `event`, `summary`), split by the hour of
each entry's time (unix s // 3600), so a time range reads only its hours:
- `sfs:{sid}:ix:<kind>:<hour>` (hash): term -> its postings in that hour, one 23-byte record per
  entry (`POSTING`) in entry-id order: the entry id, the term's count in the entry, the entry's
  length in words, its time in the hour and the positions (mod 64) the term stands at;
  `^term` -> the term's 16-byte head (`HEAD`: its postings in the hour and their best (count,
  length) pairs, for the bound on the score any of them can reach), read and written without
  copying the postings; `~bucket` -> the 27-byte postings (`PAIR_POSTING`) of the adjacent word
  pairs hashed to that bucket, which phrases read instead of their words'; field `#`: the hour's
  first and last entry ids, its entries and their words, its first entry indexed with pairs;
- `sfs:{sid}:ix:<kind>` (sorted set): the kind's hours, scored by when each hour key's TTL was set;
- `sfs:{sid}:ix:<kind>:last` (string): the id of the last entry indexed (a retry adds nothing);
- `sfs:{sid}:ix:<kind>:terms` (sorted set, in byte order): every term indexed, for prefixes.

Retention follows the entries: hours whose entries the stream's `MAXLEN ~` trimmed are dropped
(checked as an hour starts and every 16th entry of it), hour keys outlive the stream's TTL a
little, and a query keeps only postings at or above the oldest entry still held, so a trimmed or
expired entry is never a hit. Ranking is BM25 with a phrase bonus, newest first among equals;
hours are read newest first and reading stops once no hour left can reach the page. Phrases and
prefixes are answered from the postings and phrases are checked again on the text of the page.
"""

from __future__ import annotations

import math
import re
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from .redis_schema import (
    MAX_QUESTION_CHARS,
    Answer,
    Caption,
    EntryKind,
    Event,
    Hit,
    Keys,
    Summary,
    check_stream_id,
    decode_entry,
)

# ---------------------------------------------------------------------------- words

WORD_RE = re.compile(r"[^\W_]+")
MAX_TERM_CHARS = 32  # longer words are not indexed (a hash, a URL's tail): they count as positions only
MAX_TERMS_PER_ENTRY = 128  # distinct terms indexed per entry: bounds the upkeep of a runaway text
MASK_BITS = 64
# Words too common to mean anything on their own: not indexed, never required by a query (they
# still count as positions, so "moves to the left" keeps its gaps).
STOPWORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or that the their then there these this "
    "to was were with".split()
)
# One record per (entry, term). The id (ms << 16 | seq) is big-endian so the index scripts compare
# it as two 32-bit halves (Lua numbers are doubles); the time is µs into the entry's hour.
POSTING = np.dtype([("id", ">u8"), ("tf", "u1"), ("dl", "<u2"), ("us", "<u4"), ("mask", "<u8")])
_ID = struct.Struct(">Q")
_REST = struct.Struct("<BHIQ")
_PAIR_REST = struct.Struct("<IBHIQ")
assert _ID.size + _REST.size == POSTING.itemsize == 23
# Head of each term's postings in an hour, in a field of its own (`^term`), so it is read and
# updated without copying the postings: how many postings the term has in the hour, then up to 4
# (count, length) pairs, none beaten on both by another of its postings (more than 4: the highest
# counts are merged into one that beats both), so the best BM25 score of any posting of the hour
# is known without reading them.
HEAD_PAIRS = 4
HEAD = struct.Struct(">I" + "BH" * HEAD_PAIRS)
HEAD_FIELD = "^"  # a head's field: this, then the term (never a term's character)
HOUR_S = 3600
# An hour's `#` field: first and last entry ids (big-endian, as in POSTING), entries, their words,
# and the first entry indexed with word pairs (an hour begun by an index without pairs has later).
HOUR_STATS = struct.Struct(">QQIIQ")
# Adjacent word pairs, so that a phrase reads its pairs' postings, not its words' (a phrase of common
# words otherwise reads postings of nearly every entry). A pair is two consecutive indexed words
# and the distance between them (stopwords between count); its postings share one of PAIR_BUCKETS
# fields per hour (`~` and the bucket in hex: a field per distinct pair would cost more than its
# postings), each record naming its pair by a 32-bit hash. Counts are the two words' own (at most
# 15 each, in one byte), so a phrase's hits get the same BM25 as from the words' postings; the
# positions are the first word's.
PAIR_BUCKETS = 1024
PAIR_FIELD = "~"
PAIR_POSTING = np.dtype([("id", ">u8"), ("pair", "<u4"), ("tf", "u1"), ("dl", "<u2"), ("us", "<u4"), ("mask", "<u8")])
MAX_PAIR_TF = 15
MAX_PAIRS_PER_ENTRY = 128
assert _ID.size + _PAIR_REST.size == PAIR_POSTING.itemsize == 27
# A field's postings (a term's or a pair bucket's) are its value then its tail's (`+` and the field):
# new records go to the tail, which joins the value once it holds TAIL_BYTES. Redis has no append to
# a hash field, so an append rewrites the value it lands in: into a small tail, not into postings
# that grow all hour (a frequent word's hour of captions every second is 80 KB).
TAIL_FIELD = "+"
TAIL_BYTES = 512


def tail_field(field_: str) -> str:
    return TAIL_FIELD + field_

KIND_MODELS: dict[EntryKind, type] = {
    EntryKind.CAPTION: Caption, EntryKind.ANSWER: Answer, EntryKind.EVENT: Event, EntryKind.SUMMARY: Summary,
}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.casefold())


def entry_text(kind: EntryKind, entry: Any) -> str:
    """What is searched: a caption's or summary's text, an answer's text (its question is shown,
    not matched: a standing question would otherwise match every window), an event's question
    and answer (the question is what happened)."""
    if kind is EntryKind.EVENT:
        return f"{entry.question} {entry.text}"
    if kind is EntryKind.CAPTION and entry.error:
        return ""
    return entry.text or ""


def entry_time(kind: EntryKind, entry: Any) -> float:
    """When an entry happened, the time ranges filter on (unix s): a window's capture end for
    captions and events, an answer's reply time, a summary's creation."""
    if kind in (EntryKind.CAPTION, EntryKind.EVENT):
        return entry.wall_end
    return entry.answered_at if kind is EntryKind.ANSWER else entry.created_at


def entry_key(entry_id: str) -> int:
    """An entry id as one integer (ms << 16 | seq), the order of ids."""
    ms, seq = entry_id.split("-")
    return int(ms) << 16 | int(seq)


def pair_hash(first: str, gap: int, second: str) -> int:
    return zlib.crc32(f"{first} {gap} {second}".encode())


def pair_field(hash_: int) -> str:
    return f"{PAIR_FIELD}{hash_ % PAIR_BUCKETS:03x}"


@dataclass(frozen=True)
class Pair:
    """Two consecutive indexed words `gap` positions apart, as the index keys them."""

    first: str
    gap: int
    second: str

    @property
    def hash(self) -> int:
        return pair_hash(self.first, self.gap, self.second)

    @property
    def field(self) -> str:
        return pair_field(self.hash)


@dataclass(frozen=True)
class EntryPostings:
    """What one entry adds to the index: its length in words, term -> its 23-byte posting, and
    pair bucket field -> its pairs' 27-byte postings."""

    length: int
    terms: dict[str, bytes]
    pairs: dict[str, bytes]


def postings_of(text: str, entry_id: str, wall: float) -> EntryPostings:
    key = _ID.pack(entry_key(entry_id))
    us = min(int(round((wall - wall // HOUR_S * HOUR_S) * 1e6)), HOUR_S * 10 ** 6 - 1)
    tokens = words(text)
    stats: dict[str, list[int]] = {}
    indexed: list[tuple[int, str]] = []
    for position, token in enumerate(tokens):
        if token in STOPWORDS or len(token) > MAX_TERM_CHARS:
            continue
        if token not in stats:
            if len(stats) >= MAX_TERMS_PER_ENTRY:
                continue
            stats[token] = [0, 0]
        stats[token][0] += 1
        stats[token][1] |= 1 << (position % MASK_BITS)
        indexed.append((position, token))
    pairs: dict[tuple[str, int, str], int] = {}  # (first, gap, second) -> the first word's positions
    for (at, first), (then, second) in zip(indexed, indexed[1:]):
        pair = (first, then - at, second)
        if pair in pairs or len(pairs) < MAX_PAIRS_PER_ENTRY:
            pairs[pair] = pairs.get(pair, 0) | 1 << (at % MASK_BITS)
    length = min(len(tokens), 0xFFFF)
    buckets: dict[str, bytes] = {}
    for (first, gap, second), mask in pairs.items():
        hash_ = pair_hash(first, gap, second)
        counts = min(stats[first][0], MAX_PAIR_TF) << 4 | min(stats[second][0], MAX_PAIR_TF)
        field_ = pair_field(hash_)
        buckets[field_] = buckets.get(field_, b"") + key + _PAIR_REST.pack(hash_, counts, length, us, mask)
    return EntryPostings(length, {t: key + _REST.pack(min(tf, 0xFF), length, us, mask)
                                  for t, (tf, mask) in stats.items()}, buckets)


# ---------------------------------------------------------------------------- upkeep (publisher side)

# Lua helpers of both scripts: ids are 8-byte big-endian strings compared as two 32-bit halves.
_LUA_IDS = """
local R = 23
local function older(a, b)
  local ah, al = struct.unpack('>I4I4', a)
  local bh, bl = struct.unpack('>I4I4', b)
  return ah < bh or (ah == bh and al < bl)
end
local function oldest_held(stream)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not first then return nil end
  local ms, seq = string.match(first[1], '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  return struct.pack('>I4I4', math.floor(ms / 65536), (ms % 65536) * 65536 + seq)
end
"""

# KEYS: entries stream, hours set, the entry's hour key, the last indexed id's key, the terms set. ARGV: postings TTL
# (0: none), now, entry id, the id as 8 bytes, the hour, hours to renew, the entry's length in words,
# the number of terms n and of pair buckets m, one record per term, the terms in the same order, then
# the records of each pair bucket and the buckets' fields (appended, with no head). Nothing is written unless the entry is in
# the stream (an XADD of the same MULTI may have been refused) and not indexed yet (ids only grow, so
# the last indexed id tells, whatever time a retried entry carries). Each term's postings get the
# record (through its tail) and its head one more posting and maybe a new pair (a term new to the
# hour joins the terms set); a new hour key gets its TTL and its place in the hours set (scored by when its TTL was set). As an hour starts and
# every 16th entry of it, hours whose last entry the stream trimmed are dropped; each call renews
# the TTL of a few hour keys set longest ago, so none expires under a stream still written.
INDEX_ENTRY = _LUA_IDS + f"local TAIL_BYTES = {TAIL_BYTES}\n" + """
local ttl, now, id, hour = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4], ARGV[5]
local refresh, dl = tonumber(ARGV[6]), tonumber(ARGV[7])
local n, m = tonumber(ARGV[8]), tonumber(ARGV[9])
if #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3], 'COUNT', 1) == 0 then return 0 end
local last = redis.call('GET', KEYS[4])
if last and not older(last, id) then return 0 end
if ttl > 0 then redis.call('SET', KEYS[4], id, 'EX', ttl) else redis.call('SET', KEYS[4], id) end
local new_terms = {}
local stats = redis.call('HGET', KEYS[3], '#')
local first, count, words, pairs_from = id, 0, 0, id
if stats then
  first = string.sub(stats, 1, 8)
  count, words = struct.unpack('>I4I4', stats, 17)
  if #stats >= 32 then pairs_from = string.sub(stats, 25, 32) end
end
local function with_pair(head, tf, len)
  local pairs_ = {}
  if head then
    for j = 0, 3 do
      local t, d = struct.unpack('>BH', head, 1 + 3 * j)
      if t > 0 then
        if t >= tf and d <= len then return head end
        if not (t <= tf and d >= len) then pairs_[#pairs_ + 1] = {t, d} end
      end
    end
  end
  pairs_[#pairs_ + 1] = {tf, len}
  table.sort(pairs_, function(a, b) return a[1] < b[1] end)
  while #pairs_ > 4 do
    local last, before = table.remove(pairs_), pairs_[#pairs_]
    pairs_[#pairs_] = {last[1], math.min(last[2], before[2])}
  end
  local out = {}
  for j = 1, 4 do
    local p = pairs_[j] or {0, 0}
    out[j] = struct.pack('>BH', p[1], p[2])
  end
  return table.concat(out)
end
local set = {'#', first .. id .. struct.pack('>I4I4', count + 1, words + dl) .. pairs_from}
-- append records to fields: into each one's tail, and the tail into the field once it is full
local function append(fields, records)
  local tail_fields = {}
  for j, f in ipairs(fields) do tail_fields[j] = '+' .. f end
  local tails = redis.call('HMGET', KEYS[3], unpack(tail_fields))
  for j, f in ipairs(fields) do
    local tail = (tails[j] or '') .. records[j]
    if #tail >= TAIL_BYTES then
      set[#set + 1] = f
      set[#set + 1] = (redis.call('HGET', KEYS[3], f) or '') .. tail
      tail = ''
    end
    set[#set + 1] = tail_fields[j]
    set[#set + 1] = tail
  end
end
local terms, head_fields, records = {}, {}, {}
for i = 1, n do terms[i] = ARGV[9 + n + i]; head_fields[i] = '^' .. terms[i]; records[i] = ARGV[9 + i] end
local heads = redis.call('HMGET', KEYS[3], unpack(head_fields))
append(terms, records)
if m > 0 then
  local buckets, bucket_records = {}, {}
  for j = 1, m do buckets[j] = ARGV[9 + 2 * n + m + j]; bucket_records[j] = ARGV[9 + 2 * n + j] end
  append(buckets, bucket_records)
end
for i = 1, n do
  local head = heads[i]
  local held = 0
  if head then held = struct.unpack('>I4', head) else new_terms[#new_terms + 1] = 0; new_terms[#new_terms + 1] = terms[i] end
  set[#set + 1] = head_fields[i]
  set[#set + 1] = struct.pack('>I4', held + 1) .. with_pair(head and string.sub(head, 5), string.byte(records[i], 9), dl)
end
redis.call('HSET', KEYS[3], unpack(set))
if #new_terms > 0 then redis.call('ZADD', KEYS[5], unpack(new_terms)) end
if ttl > 0 then redis.call('EXPIRE', KEYS[5], ttl) end
local prefix = KEYS[2] .. ':'
if not stats then
  if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
  redis.call('ZADD', KEYS[2], now, hour)
end
if count % 16 == 0 then
  local held = oldest_held(KEYS[1])
  for _, h in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if h ~= hour then
      local s = redis.call('HGET', prefix .. h, '#')
      if not s then
        redis.call('ZREM', KEYS[2], h)
      elseif older(string.sub(s, 9, 16), held) then
        redis.call('DEL', prefix .. h)
        redis.call('ZREM', KEYS[2], h)
      end
    end
  end
end
if ttl > 0 and refresh > 0 then
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl / 3, 'LIMIT', 0, refresh)) do
    if redis.call('EXPIRE', prefix .. h, ttl) == 1 then
      redis.call('ZADD', KEYS[2], now, h)
    else
      redis.call('ZREM', KEYS[2], h)
    end
  end
end
return n
"""

# KEYS: hours sets. ARGV[1]: 'expire' (ARGV[2] seconds), 'persist' or 'delete'. Applies to every
# hour key a set names and its last indexed id (a removed or forgotten stream's index goes with its
# entries).
INDEX_LIFETIME = """
for _, hours in ipairs(KEYS) do
  local prefix = hours .. ':'
  local keys = redis.call('ZRANGE', hours, 0, -1)
  keys[#keys + 1] = 'last'
  keys[#keys + 1] = 'terms'
  for _, hour in ipairs(keys) do
    if ARGV[1] == 'expire' then redis.call('EXPIRE', prefix .. hour, ARGV[2])
    elseif ARGV[1] == 'persist' then redis.call('PERSIST', prefix .. hour)
    else redis.call('DEL', prefix .. hour) end
  end
end
return 1
"""
STALE_REFRESH = 8  # hour keys whose TTL each indexed entry renews, those set longest ago first
# Hour keys live 1.5x the stream's key TTL and are renewed every third of that TTL, so they
# outlive the entries they name (a posting of a gone entry is never a hit: queries keep only
# postings at or above the oldest entry held).
POSTINGS_TTL_FACTOR = 1.5


@dataclass(frozen=True)
class IndexedEntry:
    """What the publisher indexes with an entry: its kind, id, text and wall-clock time."""

    kind: EntryKind
    entry_id: str
    text: str
    wall: float


def index_commands(script: Any, pipe: Any, keys: Keys, stream: str, entry: IndexedEntry, ttl_s: int | None,
                   now: float | None = None) -> None:
    """Queue the index upkeep of one entry on `pipe` (after the entry's XADD in the same MULTI)."""
    postings = postings_of(entry.text, entry.entry_id, entry.wall)
    if not postings.terms:
        return
    hour = int(entry.wall // HOUR_S)
    script(
        keys=[keys.entries(stream, entry.kind), keys.index_hours(stream, entry.kind),
              keys.index_hour(stream, entry.kind, hour), keys.index_last(stream, entry.kind),
              keys.index_terms(stream, entry.kind)],
        args=[int(ttl_s * POSTINGS_TTL_FACTOR) if ttl_s else 0, now if now is not None else time.time(),
              entry.entry_id, _ID.pack(entry_key(entry.entry_id)), hour, STALE_REFRESH, postings.length,
              len(postings.terms), len(postings.pairs), *postings.terms.values(), *postings.terms,
              *postings.pairs.values(), *postings.pairs],
        client=pipe,
    )


# ---------------------------------------------------------------------------- times

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | float) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d`; ValueError otherwise."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = DURATION_RE.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use e.g. 90s, 30m, 2h or 1d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: it must be more than 0")
    return seconds


def parse_time(value: str | float | datetime, now: float | None = None) -> float:
    """Unix seconds from a unix time, an ISO 8601 date-time (local time unless it names its
    zone) or a time of day `HH:MM[:SS]` (today, local); ValueError otherwise."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _clock_time(text, now)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid time {value!r}")
    return seconds


def _clock_time(text: str, now: float | None) -> float:
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", text):
        today = datetime.fromtimestamp(time.time() if now is None else now)
        text = f"{today.date().isoformat()}T{text.zfill(5) if len(text) < 5 else text}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: use an ISO date-time (2026-11-24T14:00), a time of day (14:00) or unix seconds"
        ) from None


def time_range(since: str | float | None = None, start: str | float | datetime | None = None,
               end: str | float | datetime | None = None,
               now: float | None = None) -> tuple[float | None, float | None]:
    """The wall-clock range (start, end) of `--since D` or `--from T --to T` (either end open)."""
    now = time.time() if now is None else now
    if since is not None and (start is not None or end is not None):
        raise ValueError("give --since or --from/--to, not both")
    if since is not None:
        return now - parse_duration(since), None
    lo = parse_time(start, now) if start is not None else None
    hi = parse_time(end, now) if end is not None else None
    if lo is not None and hi is not None and hi < lo:
        raise ValueError("the range ends before it starts (--to is before --from)")
    return lo, hi


# ---------------------------------------------------------------------------- queries

MAX_QUERY_CHARS = MAX_QUESTION_CHARS
MAX_QUERY_WORDS = 32
MAX_PREFIX_TERMS = 64  # terms one prefix expands to, per stream and kind
MAX_LIMIT = 500
MAX_CHECKED = 2000  # candidates whose text a phrase is checked on, at most, for one page
K1, B = 1.2, 0.75
PHRASE_BONUS = 2.0  # an unquoted query of several words, found as written: its score doubles


@dataclass(frozen=True)
class ParsedQuery:
    """Terms and prefixes every hit holds (`match_all`) or any of them; phrases as (offset, term)
    lists (stopwords leave gaps) that must appear; `bonus`: the unquoted words as one phrase."""

    terms: tuple[str, ...]
    prefixes: tuple[str, ...]
    phrases: tuple[tuple[tuple[int, str], ...], ...]
    bonus: tuple[tuple[int, str], ...] | None


def _phrase(tokens: Sequence[str]) -> tuple[tuple[int, str], ...]:
    return tuple((i, t) for i, t in enumerate(tokens) if t not in STOPWORDS)


def check_query_text(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError("the query must be text")
    if any("\udc80" <= c <= "\udcff" for c in text):
        raise ValueError("the query is not valid UTF-8")
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"the query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
    return text


def parse_query(text: str) -> ParsedQuery:
    """`red circle` (both words), `"red circle moves left"` (that phrase), `circ*` (a prefix);
    every other character separates words. ValueError for a query with nothing to search."""
    check_query_text(text)
    phrases, plain, prefixes = [], [], []
    parts = text.split('"')
    for index, part in enumerate(parts):
        if index % 2:  # inside quotes (an unclosed quote runs to the end)
            tokens = [t for t in words(part) if len(t) <= MAX_TERM_CHARS]
            phrase = _phrase(tokens)
            if len(phrase) > 1:
                phrases.append(phrase)
            plain_terms = [t for _, t in phrase]
            if len(phrase) == 1:
                plain.append(plain_terms[0])
            elif not phrase and tokens:
                raise ValueError(f"the phrase {part.strip()!r} has only common words: search for rarer ones")
            continue
        for chunk in re.split(r"\s+", part):
            if chunk.endswith("*") and words(chunk):
                stem = words(chunk)[-1]
                plain += [t for t in words(chunk)[:-1] if t not in STOPWORDS]
                prefixes.append(stem)
            else:
                plain += [t for t in words(chunk) if t not in STOPWORDS]
    terms = tuple(dict.fromkeys(plain + [t for p in phrases for _, t in p]))
    prefixes_ = tuple(dict.fromkeys(prefixes))
    if not terms and not prefixes_:
        raise ValueError("the query has no words to search for (common words like 'the' are not searched)")
    if len(terms) + len(prefixes_) > MAX_QUERY_WORDS:
        raise ValueError(f"the query has more than {MAX_QUERY_WORDS} words")
    if any(len(t) > MAX_TERM_CHARS for t in terms):
        terms = tuple(t for t in terms if len(t) <= MAX_TERM_CHARS)
    unquoted = [t for t in words(" ".join(parts[0::2]).replace("*", " ")) if len(t) <= MAX_TERM_CHARS]
    bonus = _phrase(unquoted) if not prefixes_ and len(_phrase(unquoted)) > 1 else None
    return ParsedQuery(terms, prefixes_, tuple(phrases), bonus)


@dataclass(frozen=True)
class SearchRequest:
    """One search, validated: the same for the CLI, the API, the page and the client."""

    query: str
    streams: tuple[str, ...] | None = None  # None: every registered stream
    kinds: tuple[EntryKind, ...] = tuple(EntryKind)
    start: float | None = None  # wall-clock range, unix s (entries whose time falls in it)
    end: float | None = None
    limit: int = 20
    match_all: bool = True  # False: any word (ranked), as retrieval for questions uses

    @classmethod
    def build(cls, query: str, *, streams: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
              since: str | float | None = None, start: Any = None, end: Any = None, limit: int = 20,
              match_all: bool = True, now: float | None = None) -> SearchRequest:
        parse_query(query)
        ids = None if streams is None else tuple(dict.fromkeys(check_stream_id(s) for s in streams)) or None
        try:
            chosen = tuple(dict.fromkeys(EntryKind(k) for k in kinds)) if kinds else tuple(EntryKind)
        except ValueError:
            raise ValueError(f"invalid kind: use {', '.join(k.value for k in EntryKind)}") from None
        if not 1 <= int(limit) <= MAX_LIMIT:
            raise ValueError(f"limit must be 1-{MAX_LIMIT}")
        lo, hi = time_range(since, start, end, now)
        return cls(query, ids, chosen, lo, hi, int(limit), match_all)


@dataclass
class SearchResult:
    hits: list[Hit]
    total: int  # candidates found in the hours read (before a phrase's check on the text of the page)
    elapsed_ms: float = 0.0
    complete: bool = True  # False: reading stopped early (no hour left could reach the page): total is a floor


# KEYS: entries stream, hours set, terms set. ARGV: the number of terms n, the most terms a prefix expands to,
# the number of pair buckets b, the terms, the buckets, then the prefixes. Returns the oldest held
# entry's id (8 bytes; '' when none), XLEN, the hours holding held entries (4 bytes each), their `#`
# fields (an hour begun without pairs: its first with pairs unknown, all ones), each prefix's terms
# (the MAX_PREFIX_TERMS shortest an hour holds), per term (the query's, then the prefixes' in order) and
# hour: its head, its count of postings made that of held entries (the postings are read only in the
# hour holding the oldest held entry), then per bucket and hour its bytes. Nothing but these few
# bytes leaves Redis.
PLAN = _LUA_IDS + """
local n, most, b = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = oldest_held(KEYS[1])
if not held then return {'', 0, '', '', {}, '', ''} end
local prefix = KEYS[2] .. ':'
local hours, hour_bytes, stats, boundary = {}, {}, {}, {}
for _, h in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local s = redis.call('HGET', prefix .. h, '#')
  if s and not older(string.sub(s, 9, 16), held) then
    hours[#hours + 1] = h
    hour_bytes[#hours] = struct.pack('>I4', tonumber(h))
    if #s < 32 then s = s .. string.rep('\\255', 8) end
    stats[#hours] = s
    boundary[#hours] = older(string.sub(s, 1, 8), held)
  end
end
local terms = {}
for i = 1, n do terms[i] = ARGV[3 + i] end
local function held_anywhere(t)
  for _, h in ipairs(hours) do
    if redis.call('HEXISTS', prefix .. h, '^' .. t) == 1 then return true end
  end
  return false
end
local expansions = {}
for p = n + b + 4, #ARGV do
  local found = redis.call('ZRANGE', KEYS[3], '[' .. ARGV[p], '(' .. ARGV[p] .. '\255', 'BYLEX')
  table.sort(found, function(a, b) if #a ~= #b then return #a < #b end return a < b end)
  local chosen = {}
  for _, t in ipairs(found) do
    if #chosen == most then break end
    if held_anywhere(t) then chosen[#chosen + 1] = t; terms[#terms + 1] = t end
  end
  expansions[#expansions + 1] = chosen
end
local none = string.rep('\0', 16)
local by_term, head_fields = {}, {}
for j, t in ipairs(terms) do by_term[j] = {}; head_fields[j] = '^' .. t end
for i, h in ipairs(hours) do
  local heads = #terms > 0 and redis.call('HMGET', prefix .. h, unpack(head_fields)) or {}
  for j, t in ipairs(terms) do
    local head = heads[j]
    if not head then
      head = none
    elseif boundary[i] then
      -- the hour's oldest entries were trimmed: count the postings of held entries (ids in order)
      local v = (redis.call('HGET', prefix .. h, t) or '') .. (redis.call('HGET', prefix .. h, '+' .. t) or '')
      local lo, hi = 0, #v / R
      local total = hi
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if older(string.sub(v, mid * R + 1, mid * R + 8), held) then lo = mid + 1 else hi = mid end
      end
      head = struct.pack('>I4', total - lo) .. string.sub(head, 5)
    end
    by_term[j][i] = head
  end
end
local out = {}
for j = 1, #terms do out[j] = table.concat(by_term[j]) end
local bucket_bytes = {}
for j = 1, b do
  for _, h in ipairs(hours) do
    local f = ARGV[3 + n + j]
    local bytes = redis.call('HSTRLEN', prefix .. h, f) + redis.call('HSTRLEN', prefix .. h, '+' .. f)
    bucket_bytes[#bucket_bytes + 1] = struct.pack('>I4', bytes)
  end
end
return {held, redis.call('XLEN', KEYS[1]), table.concat(hour_bytes), table.concat(stats), expansions,
        table.concat(out), table.concat(bucket_bytes)}
"""

# KEYS: hours set. ARGV: the number of hours, the hours, then the fields (terms or pair buckets). Returns
# each field's bytes in each hour (4 bytes each, field by field), then each field's records of those
# hours (each hour's value, then its tail) in one string, hours in the order given.
FETCH = """
local k = tonumber(ARGV[1])
local prefix = KEYS[1] .. ':'
local counts, records, fields = {}, {}, {}
for j = 1, #ARGV - k - 1 do
  records[j] = {}
  fields[2 * j - 1] = ARGV[k + 1 + j]
  fields[2 * j] = '+' .. ARGV[k + 1 + j]
end
for i = 2, k + 1 do
  local values = redis.call('HMGET', prefix .. ARGV[i], unpack(fields))
  for j = 1, #ARGV - k - 1 do
    records[j][i - 1] = (values[2 * j - 1] or '') .. (values[2 * j] or '')
  end
end
for j = 1, #records do
  for i = 1, k do counts[#counts + 1] = struct.pack('>I4', #records[j][i]) end
  records[j] = table.concat(records[j])
end
return {table.concat(counts), unpack(records)}
"""
_HEAD_DTYPE = np.dtype([("count", ">u4"), ("pairs", ">u1", (HEAD.size - 4,))])
_STATS_DTYPE = np.dtype([("first", ">u8"), ("last", ">u8"), ("entries", ">u4"), ("words", ">u4"),
                         ("pairs_from", ">u8")])
assert _STATS_DTYPE.itemsize == HOUR_STATS.size  # the `#` field, as the index script writes it
FIRST_HOURS_READ = 2  # hours read in the first round; each next round reads twice as many


@dataclass
class _Segment:
    """One stream's index of one kind, as planned for one search."""

    stream: str
    kind: EntryKind
    first: int = 0  # oldest held entry id (entry_key)
    docs: int = 0  # entries held (XLEN)
    hours: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # hours holding held entries
    entries: int = 0  # entries and words of those hours
    words: int = 0
    atoms: dict[str, list[str]] = field(default_factory=dict)  # term or prefix -> the terms it reads
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # term -> postings of held entries per hour
    best: dict[str, np.ndarray] = field(default_factory=dict)  # term -> per hour, its head's (count, length) pairs
    pair_bytes: dict[str, np.ndarray] = field(default_factory=dict)  # pair bucket -> its bytes per hour
    pairs_held: bool = False  # every held entry was indexed with its pairs


@dataclass
class _Candidates:
    """Candidates found so far (columns)."""

    docs: list[np.ndarray] = field(default_factory=list)  # entry_key
    score: list[np.ndarray] = field(default_factory=list)
    wall: list[np.ndarray] = field(default_factory=list)
    segment: list[np.ndarray] = field(default_factory=list)  # index into the search's segments

    def columns(self) -> tuple[np.ndarray, ...]:
        if not self.docs:
            return np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0, np.int64)
        return tuple(np.concatenate(c) for c in (self.docs, self.score, self.wall, self.segment))


def _partial(tf: np.ndarray, dl: np.ndarray, avgdl: float) -> np.ndarray:
    """One term's BM25 part (before its idf): the same expression scores postings and bounds hours."""
    tf = tf.astype(float)
    return tf * (K1 + 1) / (tf + K1 * (1 - B + B * dl.astype(float) / avgdl))


def _rotl(mask: np.ndarray, bits: int) -> np.ndarray:
    bits %= MASK_BITS
    if bits == 0:
        return mask
    return (mask << np.uint64(bits)) | (mask >> np.uint64(MASK_BITS - bits))


def _phrase_at(masks: dict[str, np.ndarray], phrase: Sequence[tuple[int, str]]) -> np.ndarray:
    """Per document: do the phrase's terms stand at its offsets (positions mod 64)?"""
    (previous, first), *rest = phrase
    found = masks[first]
    for offset, term in rest:
        found = _rotl(found, offset - previous) & masks[term]
        previous = offset
    return found != 0


def phrase_in_text(text: str, phrase: Sequence[tuple[int, str]]) -> bool:
    tokens = words(text)
    (first_offset, _), *_ = phrase
    for start in range(len(tokens)):
        if all(start + o - first_offset < len(tokens) and tokens[start + o - first_offset] == t for o, t in phrase):
            return True
    return False


class Searcher:
    """Runs searches on a Redis connection (text) and one that returns bytes (the postings)."""

    def __init__(self, redis: Any, binary: Any, keys: Keys) -> None:
        self.redis, self.binary, self.keys = redis, binary, keys
        self._exists = redis.register_script(
            "local out = {} for i, id in ipairs(ARGV) do "
            "out[i] = #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) end return out")
        self._plan_script = binary.register_script(PLAN)
        self._fetch_script = binary.register_script(FETCH)

    def streams(self) -> list[str]:
        return sorted(self.redis.hkeys(self.keys.registry))

    def search(self, request: SearchRequest) -> SearchResult:
        """Plan (what each hour holds), then read hours newest first, a round at a time, until
        the page is settled: nothing in an hour left to read could score higher."""
        started = time.perf_counter()
        parsed = parse_query(request.query)
        streams = list(request.streams) if request.streams is not None else self.streams()
        segments = [_Segment(s, k) for s in streams for k in request.kinds]
        if not segments:
            return SearchResult([], 0, 0.0)
        phrase_pairs = [_pairs_of(phrase) for phrase in parsed.phrases]
        self._plan(segments, parsed, sorted({pair.field for pairs in phrase_pairs for pair in pairs}))
        cover = _cover(phrase_pairs, segments)
        atoms = list(parsed.terms) + list(parsed.prefixes)
        docs_total = sum(s.docs for s in segments) or 1
        avgdl = (sum(s.words for s in segments) / sum(s.entries for s in segments)
                 if any(s.entries for s in segments) else 1.0)
        df = {a: sum(int(s.counts[t].sum()) for s in segments for t in s.atoms[a]) for a in atoms}
        idf = {a: math.log(1 + (docs_total - df[a] + 0.5) / (df[a] + 0.5)) for a in atoms}
        work = self._bounds(segments, parsed, request, atoms, idf, avgdl, cover)  # (hour, segment, bound), newest first
        found = _Candidates()
        checked: dict[tuple[int, int], Hit | None] = {}
        hits: list[Hit] = []
        hours = sorted({hour for hour, _, _ in work}, reverse=True)
        done, size = 0, FIRST_HOURS_READ
        while True:
            batch = set(hours[done: done + size])
            done, size = done + len(batch), size * 2
            self._read(segments, [(h, n) for h, n, _ in work if h in batch], parsed, request, atoms, idf, avgdl,
                       found, cover)
            rest = max((b for h, _, b in work if h < hours[done - 1]), default=None) if done < len(hours) else None
            hits = self._page(segments, found, rest, parsed, request.limit, checked)
            if len(hits) == request.limit or rest is None:
                break
        total = sum(len(d) for d in found.docs)
        return SearchResult(hits, total, (time.perf_counter() - started) * 1000, complete=done >= len(hours))

    # ---- what each hour holds
    def _plan(self, segments: list[_Segment], parsed: ParsedQuery, buckets: list[str]) -> None:
        pipe = self.binary.pipeline(transaction=False)
        for seg in segments:
            self._plan_script(keys=[self.keys.entries(seg.stream, seg.kind), self.keys.index_hours(seg.stream, seg.kind),
                                    self.keys.index_terms(seg.stream, seg.kind)],
                              args=[len(parsed.terms), MAX_PREFIX_TERMS, len(buckets), *parsed.terms, *buckets,
                                    *parsed.prefixes], client=pipe)
        for seg, (first, docs, hours, stats, expansions, heads, bucket_bytes) in zip(segments, pipe.execute()):
            seg.docs = int(docs)
            seg.first = _ID.unpack(first)[0] if first else np.iinfo(np.int64).max
            seg.hours = np.frombuffer(hours, ">u4").astype(np.int64)
            held = np.frombuffer(stats, _STATS_DTYPE)
            seg.entries, seg.words = int(held["entries"].sum()), int(held["words"].sum())
            # An hour begun before pairs were indexed holds entries without them, unless those are gone.
            pairs_from, hour_first = held["pairs_from"].astype(np.uint64), held["first"].astype(np.uint64)
            seg.pairs_held = bool(np.all((pairs_from == hour_first) | (pairs_from <= np.uint64(max(seg.first, 0)))))
            per_bucket = np.frombuffer(bucket_bytes, ">u4").reshape(-1, len(seg.hours)) if len(seg.hours) else []
            seg.pair_bytes = {b: row.astype(np.int64) for b, row in zip(buckets, per_bucket)}
            seg.atoms = {t: [t] for t in parsed.terms} | {p: [] for p in parsed.prefixes}
            seg.atoms.update({p: [t.decode() for t in terms] for p, terms in zip(parsed.prefixes, expansions)})
            per_term = np.frombuffer(heads, _HEAD_DTYPE).reshape(-1, len(seg.hours)) if len(seg.hours) else []
            names = list(parsed.terms) + [t for p in parsed.prefixes for t in seg.atoms[p]]
            for name, rows in zip(names, per_term):
                seg.counts[name] = rows["count"].astype(np.int64)
                seg.best[name] = rows["pairs"].reshape(len(seg.hours), HEAD_PAIRS, 3)
            for name in names:
                seg.counts.setdefault(name, np.zeros(len(seg.hours), np.int64))

    def _bounds(self, segments: list[_Segment], parsed: ParsedQuery, request: SearchRequest, atoms: list[str],
                idf: dict[str, float], avgdl: float, cover: list[Pair]) -> list[tuple[int, int, float]]:
        """(hour, segment, the best score any entry of that hour can reach) for each hour that can
        hold a hit (in the range, every atom present for `match_all`), newest first."""
        work = []
        for number, seg in enumerate(segments):
            if not len(seg.hours):
                continue
            keep = np.ones(len(seg.hours), bool)
            if request.start is not None:
                keep &= (seg.hours + 1) * HOUR_S > request.start
            if request.end is not None:
                keep &= seg.hours * HOUR_S <= request.end
            if seg.pairs_held:  # a phrase's pair whose bucket is empty in an hour is not in it
                for pair in cover:
                    keep &= seg.pair_bytes[pair.field] > 0
            # An entry of length d holds each term at most as often as the term's best pair of
            # length <= d says, so its score is at most the bound at d; the pairs' lengths are the
            # only d worth trying (between them the counts stay and the score only falls).
            pairs = {t: seg.best[t] for a in atoms for t in seg.atoms[a] if t in seg.best}
            if not pairs:
                continue
            tf = {t: p[:, :, 0].astype(np.int64) for t, p in pairs.items()}
            dl = {t: p[:, :, 1].astype(np.int64) << 8 | p[:, :, 2] for t, p in pairs.items()}
            lengths = np.concatenate([np.where(tf[t] > 0, dl[t], 0) for t in pairs], axis=1)  # hours x d
            bound = np.zeros(lengths.shape)
            possible = np.ones(lengths.shape, bool) if request.match_all else np.zeros(lengths.shape, bool)
            for atom in atoms:
                most = np.zeros(lengths.shape, np.int64)
                for term in seg.atoms[atom]:
                    if term in pairs:
                        fits = (dl[term][:, None, :] <= lengths[:, :, None]) & (tf[term][:, None, :] > 0)
                        most += np.where(fits, tf[term][:, None, :], 0).max(axis=2)
                bound += idf[atom] * np.where(most > 0, _partial(most, lengths, avgdl), 0.0)
                possible = possible & (most > 0) if request.match_all else possible | (most > 0)
            bound = np.where(possible & (lengths > 0), bound, 0.0).max(axis=1)
            keep &= bound > 0
            if parsed.bonus is not None:
                bound *= PHRASE_BONUS
            work += [(int(h), number, float(b)) for h, b in zip(seg.hours[keep], bound[keep])]
        return sorted(work, key=lambda w: -w[0])

    # ---- reading and scoring some hours
    def _read(self, segments: list[_Segment], chosen: list[tuple[int, int]], parsed: ParsedQuery,
              request: SearchRequest, atoms: list[str], idf: dict[str, float], avgdl: float,
              found: _Candidates, cover: list[Pair]) -> None:
        """Read the postings of some hours and score them. A phrase's words come from the pairs
        in `cover` (where every held entry has its pairs), the other atoms from their terms'."""
        by_segment: dict[int, list[int]] = {}
        for hour, number in chosen:
            by_segment.setdefault(number, []).append(hour)
        pipe = self.binary.pipeline(transaction=False)
        plan = []
        for number, hours in sorted(by_segment.items()):
            seg = segments[number]
            paired = {w for pair in cover for w in (pair.first, pair.second)} if seg.pairs_held else set()
            fields = list(dict.fromkeys([t for a in atoms if a not in paired for t in seg.atoms[a]]
                                        + [pair.field for pair in cover if paired]))
            hours = sorted(hours)
            self._fetch_script(keys=[self.keys.index_hours(seg.stream, seg.kind)],
                               args=[len(hours), *hours, *fields], client=pipe)
            plan.append((number, hours, fields, paired))
        # Every segment's postings are scored together: a candidate's key is its segment's number
        # over its entry id less the oldest held (`keys`).
        keys = _Keys(segments)
        by_atom: dict[str, list[tuple[np.ndarray, ...]]] = {a: [] for a in atoms}
        by_pair: dict[str, list[tuple[np.ndarray, ...]]] = {}
        for (number, hours, fields, paired), (sizes, *blobs) in zip(plan, pipe.execute()):
            seg = segments[number]
            sizes = np.frombuffer(sizes, ">u4").reshape(len(fields), len(hours))
            parts = {}
            for name, blob, per_hour in zip(fields, blobs, sizes):
                records = np.frombuffer(blob, PAIR_POSTING if name.startswith(PAIR_FIELD) else POSTING)
                walls = np.repeat(np.asarray(hours, np.int64) * HOUR_S, per_hour // records.dtype.itemsize)
                ids = records["id"].astype(np.int64)
                held = ids >= seg.first
                records, ids = records[held], ids[held]
                parts[name] = (keys.of(number, ids), records, walls[held] + records["us"] / 1e6)
            for atom in atoms:
                if atom not in paired:
                    by_atom[atom] += [parts[t] for t in seg.atoms[atom]]
            for pair in cover if paired else ():
                by_pair.setdefault(pair.field, []).append(parts[pair.field])
        postings = {a: _merge(by_atom[a]) for a in atoms}
        if by_pair:
            read = {f: tuple(np.concatenate(column) for column in zip(*parts)) for f, parts in by_pair.items()}
            for word, found_in_pairs in _pair_postings(cover, read).items():
                postings[word] = _union(postings[word], found_in_pairs)
        self._score(keys, postings, parsed, request, atoms, idf, avgdl, found)

    def _score(self, keys: _Keys, postings: dict[str, tuple[np.ndarray, ...]], parsed: ParsedQuery,
               request: SearchRequest, atoms: list[str], idf: dict[str, float], avgdl: float,
               found: _Candidates) -> None:
        atom_keys = [postings[a][0] for a in atoms]
        present = [k for k in atom_keys if len(k)]
        if request.match_all:
            if len(present) < len(atoms):
                return
            docs = present[0]
            for k in present[1:]:
                docs = np.intersect1d(docs, k, assume_unique=True)
        else:
            docs = np.unique(np.concatenate(present)) if present else np.empty(0, np.int64)
        if not len(docs):
            return
        score = np.zeros(len(docs))
        wall = np.zeros(len(docs))
        masks = {}
        for atom, k in zip(atoms, atom_keys):
            if not len(k):
                masks[atom] = np.zeros(len(docs), np.uint64)
                continue
            _, tf, dl, walls, mask = postings[atom]
            where = np.minimum(np.searchsorted(k, docs), len(k) - 1)
            hit = k[where] == docs
            score += idf[atom] * np.where(hit, _partial(tf[where], dl[where], avgdl), 0.0)
            wall = np.where(hit, walls[where], wall)
            masks[atom] = np.where(hit, mask[where], np.uint64(0))
        keep = np.ones(len(docs), bool)
        if request.start is not None:
            keep &= wall >= request.start
        if request.end is not None:
            keep &= wall <= request.end
        for phrase in parsed.phrases:
            keep &= _phrase_at(masks, phrase)
        if parsed.bonus is not None:
            score = np.where(_phrase_at(masks, parsed.bonus), score * PHRASE_BONUS, score)
        found.docs.append(keys.entry(docs[keep]))
        found.score.append(score[keep])
        found.wall.append(wall[keep])
        found.segment.append(keys.segment(docs[keep]))

    # ---- the page
    def _page(self, segments: list[_Segment], found: _Candidates, rest: float | None, parsed: ParsedQuery,
              limit: int, checked: dict[tuple[int, int], Hit | None]) -> list[Hit]:
        """The page from the candidates no unread hour can outrank (score at least `rest`, the
        best of the hours left: those are older, so they lose ties too), best first, then newest."""
        docs, score, wall, segment = found.columns()
        settled = np.flatnonzero(score >= rest) if rest is not None else np.arange(len(docs))
        order = settled[np.lexsort((-wall[settled], -score[settled]))][:MAX_CHECKED]
        hits: list[Hit] = []
        position = 0
        while len(hits) < limit and position < len(order):
            batch = order[position: position + max(limit - len(hits), 16)]
            position += len(batch)
            unknown = [row for row in batch if (int(segment[row]), int(docs[row])) not in checked]
            pipe = self.redis.pipeline(transaction=False)
            for row in unknown:
                seg, doc = segments[segment[row]], int(docs[row])
                entry_id = f"{doc >> 16}-{doc & 0xFFFF}"
                pipe.xrange(self.keys.entries(seg.stream, seg.kind), entry_id, entry_id, count=1)
            for row, entry in zip(unknown, pipe.execute() if unknown else []):
                checked[(int(segment[row]), int(docs[row]))] = self._hit(segments[segment[row]], entry, parsed,
                                                                          float(score[row]))
            for row in batch:
                hit = checked[(int(segment[row]), int(docs[row]))]
                if hit is not None:
                    hits.append(hit)
                    if len(hits) == limit:
                        break
        return self.with_pictures(hits)

    @staticmethod
    def _hit(seg: _Segment, found: list, parsed: ParsedQuery, score: float) -> Hit | None:
        if not found:
            return None  # trimmed between the two reads
        entry = decode_entry(KIND_MODELS[seg.kind], found[0][1])
        text = entry_text(seg.kind, entry)
        if not all(phrase_in_text(text, p) for p in parsed.phrases):
            return None  # positions are kept mod 64: a long text may only seem to hold it
        return make_hit(seg.stream, seg.kind, found[0][0], entry, entry_time(seg.kind, entry), score)

    def with_pictures(self, hits: list[Hit]) -> list[Hit]:
        """Name each hit's window picture while Redis holds it: an event window's snapshot, or the
        stream's latest picture while that window is still the newest."""
        windows = [(h, h.window_entry_id) for h in hits if h.window_entry_id is not None]
        if not windows:
            return hits
        pipe = self.redis.pipeline(transaction=False)
        for hit, window_id in windows:
            self._exists(keys=[self.keys.snapshots(hit.stream)], args=[window_id], client=pipe)
            pipe.hget(self.keys.frame(hit.stream), "entry_id")
        replies = pipe.execute()
        pictures = {}
        for (hit, window_id), held, latest in zip(windows, replies[0::2], replies[1::2]):
            if held and held[0]:
                pictures[id(hit)] = {"picture_key": self.keys.snapshots(hit.stream), "picture_id": window_id}
            elif latest == window_id:
                pictures[id(hit)] = {"picture_key": self.keys.frame(hit.stream), "picture_id": window_id}
        return [h.model_copy(update=pictures[id(h)]) if id(h) in pictures else h for h in hits]


def _pairs_of(phrase: Sequence[tuple[int, str]]) -> list[Pair]:
    return [Pair(first, then - at, second) for (at, first), (then, second) in zip(phrase, phrase[1:])]


def _cover(phrase_pairs: list[list[Pair]], segments: list[_Segment]) -> list[Pair]:
    """The pairs a search reads for its phrases: for each phrase, its first and last pair and, for
    each word those leave out, the one of its two pairs whose buckets hold fewer bytes."""
    def size(pair: Pair) -> int:
        return sum(int(s.pair_bytes[pair.field].sum()) for s in segments if s.pairs_held and pair.field in s.pair_bytes)

    chosen: dict[Pair, None] = {}
    for pairs in phrase_pairs:
        picked = {0, len(pairs) - 1}
        for word in range(1, len(pairs)):  # word i stands in pairs i - 1 and i
            if word - 1 not in picked and word not in picked:
                picked.add(min((word - 1, word), key=lambda i: size(pairs[i])))
        chosen.update(dict.fromkeys(pairs[i] for i in sorted(picked)))
    return list(chosen)


def _pair_postings(cover: list[Pair], parts: dict[str, tuple[np.ndarray, ...]]) -> dict[str, tuple[np.ndarray, ...]]:
    """Each word of the pairs read: (keys, its counts, lengths, times, positions) of the entries
    holding every read pair of that word, at the positions those pairs put it. `parts`: bucket ->
    (keys, records, times)."""
    by_word: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for pair in cover:
        keys, records, walls = parts.get(pair.field, (np.empty(0, np.int64), np.empty(0, PAIR_POSTING), np.empty(0)))
        mine = records["pair"] == pair.hash
        keys, index = np.unique(keys[mine], return_index=True)  # a hash collision within an entry: once
        records, walls = records[mine][index], walls[mine][index]
        dl, mask = records["dl"].astype(np.int64), records["mask"].astype(np.uint64)
        by_word.setdefault(pair.first, []).append((keys, (records["tf"] >> 4).astype(np.int64), dl, walls, mask))
        by_word.setdefault(pair.second, []).append(
            (keys, (records["tf"] & MAX_PAIR_TF).astype(np.int64), dl, walls, _rotl(mask, pair.gap)))
    out = {}
    for word, (found, *more) in by_word.items():
        keys, tf, dl, walls, mask = found
        for other_keys, _, _, _, other_mask in more:
            keys, mine, theirs = np.intersect1d(keys, other_keys, assume_unique=True, return_indices=True)
            tf, dl, walls, mask = tf[mine], dl[mine], walls[mine], mask[mine] & other_mask[theirs]
        out[word] = (keys, tf, dl, walls, mask)
    return out


def _union(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Two atoms' postings of different segments as one, in key order."""
    if not len(a[0]):
        return b
    order = np.argsort(np.concatenate([a[0], b[0]]), kind="stable")
    return tuple(np.concatenate([x, y])[order] for x, y in zip(a, b))


class _Keys:
    """One int64 per candidate of a search: its segment's number in the high bits, its entry id
    less the oldest entry any segment holds in the rest (ids are ms << 16: 2^48 of them span 136
    years at 65,536 segments)."""

    def __init__(self, segments: list[_Segment]) -> None:
        self.shift = 63 - max(1, (len(segments) - 1).bit_length())
        self.base = min((s.first for s in segments if len(s.hours)), default=0)

    def of(self, number: int, ids: np.ndarray) -> np.ndarray:
        return (number << self.shift) | (ids - self.base)

    def entry(self, keys: np.ndarray) -> np.ndarray:
        return (keys & ((1 << self.shift) - 1)) + self.base

    def segment(self, keys: np.ndarray) -> np.ndarray:
        return keys >> self.shift


def _merge(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """(keys, counts, lengths, times, positions), one per key in key order, from parts of (keys,
    records, times): a prefix's terms summed (counts) and or-ed (positions)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        empty = np.empty(0, np.int64)
        return empty, empty, empty, np.empty(0), np.empty(0, np.uint64)
    keys, records, walls = (np.concatenate(c) for c in zip(*parts)) if len(parts) > 1 else parts[0]
    tf, dl, mask = records["tf"].astype(np.int64), records["dl"].astype(np.int64), records["mask"].astype(np.uint64)
    if len(keys) > 1 and (keys[1:] <= keys[:-1]).any():
        order = np.argsort(keys, kind="stable")
        keys, tf, dl, walls, mask = keys[order], tf[order], dl[order], walls[order], mask[order]
        unique, start = np.unique(keys, return_index=True)
        if len(unique) < len(keys):
            tf = np.add.reduceat(tf, start)
            mask = np.bitwise_or.reduceat(mask, start)
            keys, dl, walls = unique, dl[start], walls[start]
    return keys, tf, dl, walls, mask


def make_hit(stream: str, kind: EntryKind, entry_id: str, entry: Any, wall: float, score: float = 0.0) -> Hit:
    ms = entry_id.split("-")[0]
    common = dict(stream=stream, kind=kind, entry_id=entry_id, wall_time=wall, score=round(score, 4),
                  start=entry.start, end=entry.end, text=entry.text or "")
    if kind is EntryKind.SUMMARY:
        return Hit(**common, window=entry.last_window, first_window=entry.first_window)
    question = entry.question if kind in (EntryKind.ANSWER, EntryKind.EVENT) else None
    return Hit(**common, window=entry.window, question=question, window_entry_id=f"{ms}-0")


def picture_path(stream: str, item: Any) -> str | None:
    """The web app's URL (relative) of the picture a Hit or EventSpan names, if Redis holds one."""
    if item.picture_key is None:
        return None
    if item.picture_key.endswith(":frame"):
        return f"/api/streams/{stream}/frame.jpg?w={item.picture_id}"
    return f"/api/streams/{stream}/snapshots/{item.picture_id}.jpg"


__all__ = ["Searcher", "SearchRequest", "SearchResult", "IndexedEntry", "index_commands",
           "parse_query", "parse_duration", "parse_time", "time_range", "picture_path", "INDEX_ENTRY",
           "INDEX_LIFETIME"]
