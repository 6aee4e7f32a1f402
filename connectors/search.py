"""Search over every caption, answer, event and summary Redis holds: an inverted index kept in
Redis itself, written in the same MULTI/EXEC as the entries it indexes (plain Redis 7 / Valkey,
no modules).

Layout, per stream and entry kind (`caption`, `answer`, `event`, `summary`):
- `sfs:{sid}:ix:<kind>:<term>` (string): the term's postings, appended in entry-id order, one
  fixed 30-byte record each (`POSTING`): the entry id, the term's count in the entry, the
  entry's length in words, its wall-clock time and the positions (mod 64) the term stands at;
- `sfs:{sid}:ix:<kind>` (sorted set): the kind's terms, scored by when each key's TTL was set.

Retention follows the entries: writes drop the postings of entries the stream's `MAXLEN ~`
trimmed (a prefix, since ids only grow), postings keys outlive the stream's TTL a little, and a
query keeps only postings at or above the oldest entry still held, so a trimmed or expired entry
is never a hit. Ranking is BM25 with a phrase bonus, newest first among equals; phrases and prefixes are
answered from the postings and phrases are checked again on the text of the page returned.
"""

from __future__ import annotations

import math
import re
import struct
import time
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
# One record per (entry, term): id ms and seq first (the index script reads them), then what
# ranking needs. float64 holds an id's milliseconds exactly (< 2**53).
POSTING = np.dtype([("ms", "<f8"), ("seq", "<u2"), ("tf", "<u2"), ("dl", "<u2"), ("wall", "<f8"), ("mask", "<u8")])
_RECORD = struct.Struct("<dHHHdQ")
assert _RECORD.size == POSTING.itemsize == 30

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


def postings_of(text: str, entry_id: str, wall: float) -> dict[str, bytes]:
    """term -> its 30-byte posting for one entry."""
    ms, seq = (int(x) for x in entry_id.split("-"))
    tokens = words(text)
    stats: dict[str, list[int]] = {}
    for position, token in enumerate(tokens):
        if token in STOPWORDS or len(token) > MAX_TERM_CHARS:
            continue
        if token not in stats:
            if len(stats) >= MAX_TERMS_PER_ENTRY:
                continue
            stats[token] = [0, 0]
        stats[token][0] += 1
        stats[token][1] |= 1 << (position % MASK_BITS)
    length = min(len(tokens), 0xFFFF)
    return {t: _RECORD.pack(ms, seq, min(tf, 0xFFFF), length, wall, mask) for t, (tf, mask) in stats.items()}


# ---------------------------------------------------------------------------- upkeep (publisher side)

# KEYS: entries stream, vocabulary, postings keys. ARGV: postings TTL (0: none), now, entry id, its
# ms and seq, stale terms to refresh, then one record per postings key, then the terms in the same
# order. Nothing is appended unless the entry is in the stream (an XADD of the same MULTI may have
# been refused) and not indexed yet (a retried window: every key of its terms already ends at or
# past it, so the first tells). One APPEND per term; a new key gets its TTL and its place in the
# vocabulary (scored by when its TTL was set), every 16th posting of a key drops the postings of
# entries the stream trimmed (a prefix: ids only grow), and each call renews the TTL of a few keys
# set longest ago, so every key is renewed before it could expire under a stream still written.
INDEX_ENTRY = """
local ttl, now, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local ms, seq, refresh = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local n = #KEYS - 2
local R = 30
if #redis.call('XRANGE', KEYS[1], id, id, 'COUNT', 1) == 0 then return 0 end
local function older(a_ms, a_seq, b_ms, b_seq) return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq) end
local last = redis.call('GETRANGE', KEYS[3], -R, -R + 9)
if #last == 10 then
  local l_ms, l_seq = struct.unpack('<dH', last)
  if not older(l_ms, l_seq, ms, seq) then return 0 end
end
local f_ms, f_seq
local function trim(key, length)
  if not f_ms then
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
    f_ms, f_seq = string.match(first, '^(%d+)-(%d+)$')
    f_ms, f_seq = tonumber(f_ms), tonumber(f_seq)
  end
  local lo, hi = 0, length / R
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local p_ms, p_seq = struct.unpack('<dH', redis.call('GETRANGE', key, mid * R, mid * R + 9))
    if older(p_ms, p_seq, f_ms, f_seq) then lo = mid + 1 else hi = mid end
  end
  if lo > 0 then redis.call('SET', key, redis.call('GETRANGE', key, lo * R, -1), 'KEEPTTL') end
end
for i = 1, n do
  local key = KEYS[i + 2]
  local length = redis.call('APPEND', key, ARGV[6 + i])
  if length == R then
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    redis.call('ZADD', KEYS[2], now, ARGV[6 + n + i])
  elseif length % (16 * R) == 0 then
    trim(key, length)
  end
end
if ttl > 0 and refresh > 0 then
  local prefix = KEYS[2] .. ':'
  for _, term in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl / 3, 'LIMIT', 0, refresh)) do
    if redis.call('EXPIRE', prefix .. term, ttl) == 1 then
      redis.call('ZADD', KEYS[2], now, term)
    else
      redis.call('ZREM', KEYS[2], term)
    end
  end
end
return n
"""

# KEYS: vocabularies. ARGV[1]: 'expire' (ARGV[2] seconds), 'persist' or 'delete'. Applies to every
# postings key a vocabulary names (a removed or forgotten stream's index goes with its entries).
INDEX_LIFETIME = """
for _, vocab in ipairs(KEYS) do
  local prefix = vocab .. ':'
  for _, term in ipairs(redis.call('ZRANGE', vocab, 0, -1)) do
    if ARGV[1] == 'expire' then redis.call('EXPIRE', prefix .. term, ARGV[2])
    elseif ARGV[1] == 'persist' then redis.call('PERSIST', prefix .. term)
    else redis.call('DEL', prefix .. term) end
  end
end
return 1
"""
STALE_REFRESH = 8  # postings keys whose TTL each indexed entry renews, those set longest ago first
# Postings keys live 1.5x the stream's key TTL and are renewed every half of that TTL, so they
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
    if not postings:
        return
    terms = list(postings)
    ms, seq = entry.entry_id.split("-")
    script(
        keys=[keys.entries(stream, entry.kind), keys.index_terms(stream, entry.kind),
              *(keys.index_postings(stream, entry.kind, t) for t in terms)],
        args=[int(ttl_s * POSTINGS_TTL_FACTOR) if ttl_s else 0, now if now is not None else time.time(),
              entry.entry_id, ms, seq, STALE_REFRESH,
              *(postings[t] for t in terms), *terms],
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
    total: int  # candidates found (before a phrase's check on the text of the page)
    elapsed_ms: float = 0.0


@dataclass
class _Segment:
    """One stream's postings of one kind."""

    stream: str
    kind: EntryKind
    first: int = 0  # oldest held entry id as ms * 65536 + seq; beyond any id when none
    docs: int = 0  # entries held (XLEN)
    atoms: dict[str, np.ndarray] = field(default_factory=dict)  # term or prefix -> postings


@dataclass(frozen=True)
class _Ranked:
    """Every candidate (columns) and the order to read them in."""

    docs: np.ndarray  # entry id as ms * 65536 + seq
    score: np.ndarray
    wall: np.ndarray
    segment: np.ndarray  # index into the search's segments
    order: np.ndarray


def _key(records: np.ndarray) -> np.ndarray:
    return records["ms"].astype(np.int64) * 65536 + records["seq"].astype(np.int64)


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

    def streams(self) -> list[str]:
        return sorted(self.redis.hkeys(self.keys.registry))

    def search(self, request: SearchRequest) -> SearchResult:
        started = time.perf_counter()
        parsed = parse_query(request.query)
        streams = list(request.streams) if request.streams is not None else self.streams()
        segments = [_Segment(s, k) for s in streams for k in request.kinds]
        if not segments:
            return SearchResult([], 0, 0.0)
        expansions = self._expand(segments, parsed.prefixes)
        self._load(segments, parsed, expansions)
        ranked = self._rank(segments, parsed, request)
        hits = self._page(segments, ranked, parsed, request.limit)
        return SearchResult(hits, len(ranked.order), (time.perf_counter() - started) * 1000)

    # ---- reading the postings
    def _expand(self, segments: list[_Segment], prefixes: Sequence[str]) -> dict[tuple[str, str, str], list[str]]:
        """(stream, kind, prefix) -> the terms it stands for (at most MAX_PREFIX_TERMS, shortest first)."""
        if not prefixes:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for seg in segments:
            pipe.zrange(self.keys.index_terms(seg.stream, seg.kind), 0, -1)
        out = {}
        for seg, vocab in zip(segments, pipe.execute()):
            for prefix in prefixes:
                matching = sorted((t for t in vocab if t.startswith(prefix)), key=lambda t: (len(t), t))
                out[(seg.stream, seg.kind, prefix)] = matching[:MAX_PREFIX_TERMS]
        return out

    def _load(self, segments: list[_Segment], parsed: ParsedQuery, expansions: dict) -> None:
        pipe = self.binary.pipeline(transaction=False)
        plan = []
        for seg in segments:
            entries = self.keys.entries(seg.stream, seg.kind)
            pipe.xrange(entries, "-", "+", count=1)
            pipe.xlen(entries)
            wanted = [(t, t) for t in parsed.terms]
            wanted += [(p, t) for p in parsed.prefixes for t in expansions[(seg.stream, seg.kind, p)]]
            for _, term in wanted:
                pipe.get(self.keys.index_postings(seg.stream, seg.kind, term))
            plan.append((seg, wanted))
        replies = iter(pipe.execute())
        for seg, wanted in plan:
            first, seg.docs = next(replies), int(next(replies))
            if first:
                ms, seq = first[0][0].decode().split("-")
                seg.first = int(ms) * 65536 + int(seq)
            else:
                seg.first = np.iinfo(np.int64).max  # nothing held: no posting counts
            parts: dict[str, list[np.ndarray]] = {}
            for atom, _ in wanted:
                raw = next(replies) or b""
                records = np.frombuffer(raw[: len(raw) - len(raw) % POSTING.itemsize], dtype=POSTING)
                parts.setdefault(atom, []).append(records[_key(records) >= seg.first])
            for atom in list(parsed.terms) + list(parsed.prefixes):
                seg.atoms[atom] = _merge(parts.get(atom, []))

    # ---- ranking
    def _rank(self, segments: list[_Segment], parsed: ParsedQuery, request: SearchRequest) -> _Ranked:
        atoms = list(parsed.terms) + list(parsed.prefixes)
        docs_total = sum(s.docs for s in segments) or 1
        df = {a: sum(len(s.atoms[a]) for s in segments) for a in atoms}
        idf = {a: math.log(1 + (docs_total - df[a] + 0.5) / (df[a] + 0.5)) for a in atoms}
        lengths = [s.atoms[a]["dl"] for s in segments for a in atoms if len(s.atoms[a])]
        avgdl = float(np.concatenate(lengths).mean()) if lengths else 1.0
        parts: list[tuple[np.ndarray, ...]] = []
        for number, seg in enumerate(segments):
            keys = [_key(seg.atoms[a]) for a in atoms]
            present = [k for k in keys if len(k)]
            if request.match_all:
                if len(present) < len(atoms):
                    continue
                docs = present[0]
                for k in present[1:]:
                    docs = np.intersect1d(docs, k, assume_unique=True)
            else:
                docs = np.unique(np.concatenate(present)) if present else np.empty(0, np.int64)
            if not len(docs):
                continue
            score = np.zeros(len(docs))
            wall = np.zeros(len(docs))
            masks = {}
            for atom, k in zip(atoms, keys):
                if not len(k):
                    masks[atom] = np.zeros(len(docs), np.uint64)
                    continue
                where = np.minimum(np.searchsorted(k, docs), len(k) - 1)
                found, rows = k[where] == docs, seg.atoms[atom][where]
                tf = np.where(found, rows["tf"], 0).astype(float)
                score += idf[atom] * tf * (K1 + 1) / (tf + K1 * (1 - B + B * rows["dl"] / avgdl))
                wall = np.where(found, rows["wall"], wall)
                masks[atom] = np.where(found, rows["mask"], np.uint64(0))
            keep = np.ones(len(docs), bool)
            if request.start is not None:
                keep &= wall >= request.start
            if request.end is not None:
                keep &= wall <= request.end
            for phrase in parsed.phrases:
                keep &= _phrase_at(masks, phrase)
            if parsed.bonus is not None:
                score = np.where(_phrase_at(masks, parsed.bonus), score * PHRASE_BONUS, score)
            parts.append((docs[keep], score[keep], wall[keep], np.full(int(keep.sum()), number)))
        if not parts:
            return _Ranked(*(np.empty(0, t) for t in (np.int64, float, float, np.int64)), np.empty(0, np.int64))
        docs, score, wall, segment = (np.concatenate(column) for column in zip(*parts))
        return _Ranked(docs, score, wall, segment, np.lexsort((-wall, -score)))  # best first, then newest

    # ---- the page
    def _page(self, segments: list[_Segment], ranked: _Ranked, parsed: ParsedQuery, limit: int) -> list[Hit]:
        hits: list[Hit] = []
        position = 0
        while len(hits) < limit and position < min(len(ranked.order), MAX_CHECKED):
            batch = ranked.order[position: position + max(limit - len(hits), 16)]
            position += len(batch)
            pipe = self.redis.pipeline(transaction=False)
            for row in batch:
                seg, doc = segments[ranked.segment[row]], int(ranked.docs[row])
                entry_id = f"{doc >> 16}-{doc & 0xFFFF}"
                pipe.xrange(self.keys.entries(seg.stream, seg.kind), entry_id, entry_id, count=1)
            for row, found in zip(batch, pipe.execute()):
                if not found:
                    continue  # trimmed between the two reads
                seg = segments[ranked.segment[row]]
                entry = decode_entry(KIND_MODELS[seg.kind], found[0][1])
                text = entry_text(seg.kind, entry)
                if not all(phrase_in_text(text, p) for p in parsed.phrases):
                    continue  # positions are kept mod 64: a long text may only seem to hold it
                hits.append(make_hit(seg.stream, seg.kind, found[0][0], entry, float(ranked.wall[row]),
                                     float(ranked.score[row])))
                if len(hits) == limit:
                    break
        return self.with_pictures(hits)

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


def _merge(parts: list[np.ndarray]) -> np.ndarray:
    """One posting per entry, in id order: a prefix's terms summed (counts) and or-ed (positions)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.empty(0, POSTING)
    if len(parts) == 1:
        return parts[0]
    records = np.concatenate(parts)
    keys = _key(records)
    order = np.argsort(keys, kind="stable")
    records, keys = records[order], keys[order]
    unique, start = np.unique(keys, return_index=True)
    merged = records[start].copy()
    merged["tf"] = np.minimum(np.add.reduceat(records["tf"].astype(np.int64), start), 0xFFFF)
    merged["mask"] = np.bitwise_or.reduceat(records["mask"], start)
    return merged


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
