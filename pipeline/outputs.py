"""File outputs of file streams.

- `captions.jsonl`: one object per window with the window's full time range (`start`/`end`:
  stream seconds of its first and last frame), so overlapping windows overlap here.
- `captions.vtt`: a subtitle track that plays along the video. At any moment one cue shows,
  the newest window's caption, from when that window becomes current until the next one
  does: the first cue covers the whole first window, each later cue starts where the
  previous one ended (with a constant stride: the window's last `stride` frames). A window
  that failed (no caption) shows nothing for its stretch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from connectors.redis_schema import Caption


def vtt_timestamp(seconds: float) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


class CaptionFiles:
    """Appends one JSON line per window and one WebVTT cue per captioned window, flushed as they come."""

    def __init__(self, folder: Path, frame_interval: float, earlier: Sequence[Caption] = ()):
        """`earlier`: the captions a continuing run already has in Redis, the source of truth
        for the windows it holds: the files are rewritten with them, so a run killed between
        Redis and the file, or mid-line, still leaves each window exactly once in valid files.
        Redis keeps only the last `history_len` captions: the windows before the first of
        `earlier` are kept from the file's own whole lines."""
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = folder / "captions.jsonl"
        self.vtt_path = folder / "captions.vtt"
        # A cue ends when its last frame's display interval ends, so cues never have zero length.
        self.frame_interval = frame_interval
        self.cue_start: float | None = None  # where the next cue starts: the end of the last one
        kept = self._records_before(earlier[0].window) if earlier else []
        self._jsonl = self.jsonl_path.open("w", encoding="utf-8")
        self._vtt = self.vtt_path.open("w", encoding="utf-8")
        self._vtt.write("WEBVTT\n\n")
        for record in kept:
            self._write_record(record)
        for caption in earlier:
            self.write(caption)

    def _records_before(self, window: int) -> list[dict]:
        """The file's whole lines of windows before `window`, each once, in window order."""
        records: dict[int, dict] = {}
        try:
            lines = self.jsonl_path.read_text(encoding="utf-8").split("\n")[:-1]  # the last is cut, or ""
        except FileNotFoundError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("window"), int) and 0 <= record["window"] < window:
                records.setdefault(record["window"], record)
        return [records[w] for w in sorted(records)]

    def write(self, caption: Caption) -> None:
        record = {
            "stream": caption.stream,
            "window": caption.window,
            "start": caption.start,
            "end": caption.end,
            "caption": caption.text,
            "latency_s": caption.latency_s,
        }
        if caption.error is not None:
            record["error"] = caption.error
        self._write_record(record)

    def _write_record(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        cue_start = record["start"] if self.cue_start is None else self.cue_start
        cue_end = record["end"] + self.frame_interval
        if record.get("error") is not None:  # no cue: nothing shows until the next captioned window
            self.cue_start = max(cue_start, cue_end)
            return
        if round(cue_end * 1000) <= round(cue_start * 1000):
            return  # ends no later than the cue before it (a window already on screen): nothing new to show
        # A blank line would end the cue and "-->" starts a timing line: keep the text's lines, not those.
        lines = [line.strip().replace("-->", "->") for line in record["caption"].splitlines()]
        text = "\n".join(line for line in lines if line) or "(no caption)"
        self._vtt.write(f"{record['window']}\n{vtt_timestamp(cue_start)} --> {vtt_timestamp(cue_end)}\n{text}\n\n")
        self._vtt.flush()
        self.cue_start = cue_end

    def write_summary(self, markdown: str) -> None:
        """summary.md, replaced whole (written to a temporary name first)."""
        partial = self.jsonl_path.with_name("summary.md.partial")
        partial.write_text(markdown, encoding="utf-8")
        partial.replace(self.jsonl_path.with_name("summary.md"))

    def close(self) -> None:
        self._jsonl.close()
        self._vtt.close()
