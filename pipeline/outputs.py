"""File outputs of file streams: `captions.jsonl` and `captions.vtt` (cues = window time ranges)."""

from __future__ import annotations

import json
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

    def __init__(self, folder: Path, frame_interval: float, append: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = folder / "captions.jsonl"
        self.vtt_path = folder / "captions.vtt"
        # A cue ends when its last frame's display interval ends, so cues never have zero length.
        self.frame_interval = frame_interval
        mode = "a" if append and self.vtt_path.exists() else "w"
        self._jsonl = self.jsonl_path.open(mode, encoding="utf-8")
        self._vtt = self.vtt_path.open(mode, encoding="utf-8")
        if mode == "w":
            self._vtt.write("WEBVTT\n\n")

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
        self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        if caption.error is not None:  # no cue: the window has no caption to show
            return
        text = caption.text.replace("-->", "->").strip() or "(no caption)"
        cue_end = caption.end + self.frame_interval
        self._vtt.write(f"{caption.window}\n{vtt_timestamp(caption.start)} --> {vtt_timestamp(cue_end)}\n{text}\n\n")
        self._vtt.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._vtt.close()
