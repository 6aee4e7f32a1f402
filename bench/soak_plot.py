"""The soak's plot, drawn with Pillow (a dependency already): memory, caption latency and each
stream's state over time, faults marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

WIDTH, PANEL, MARGIN = 1400, 300, 70
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
STATE_COLOURS = {"live": (44, 160, 44), "starting": (199, 199, 199), "connecting": (255, 187, 120), "reconnecting": (255, 127, 14),
                 "stale": (214, 39, 40), "none": (90, 90, 90), "ended": (31, 119, 180), "stopped": (127, 127, 127),
                 "failed": (0, 0, 0)}
MEMORY = ("driver", "ModelWorker", "IngestActor", "raylet", "gcs_server", "ray_other", "web", "redis")


def plot(path: Path, rows: Sequence[dict[str, Any]], faults: Sequence[tuple[float, str]],
         streams: Sequence[str]) -> None:
    """`rows`: the soak's samples (t_s and its columns); `faults`: (t_s, kind)."""
    if not rows:
        return
    lanes = len(streams)
    height = 3 * MARGIN + 2 * PANEL + max(24 * lanes, 16 * len(STATE_COLOURS)) + 40
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    t0, t1 = rows[0]["t_s"], max(rows[-1]["t_s"], rows[0]["t_s"] + 1)

    def x(t: float) -> float:
        return MARGIN + (t - t0) / (t1 - t0) * (WIDTH - 2 * MARGIN - 160)

    memory = {name: [(r["t_s"], _num(r.get(f"{name}_rss_mb"))) for r in rows] for name in MEMORY}
    memory["redis used"] = [(r["t_s"], _num(r.get("redis_used_mb"))) for r in rows]
    _panel(draw, "RSS MB (redis used: used_memory)", MARGIN, memory, x)
    latency = {f"{s} p99": [(r["t_s"], _num(r.get(f"{s}_p99_s"))) for r in rows] for s in streams}
    _panel(draw, "caption latency p99, s", 2 * MARGIN + PANEL, latency, x)
    top = 3 * MARGIN + 2 * PANEL
    draw.text((MARGIN, top - 20), "state per stream", fill="black")
    for lane, stream in enumerate(streams):
        y = top + 24 * lane
        draw.text((5, y + 4), stream[:9], fill="black")
        for a, b in zip(rows, rows[1:]):
            colour = STATE_COLOURS.get(str(b.get(f"{stream}_state")), (200, 200, 200))
            draw.rectangle([x(a["t_s"]), y, x(b["t_s"]), y + 18], fill=colour)
    for i, (state, colour) in enumerate(STATE_COLOURS.items()):
        draw.rectangle([WIDTH - 150, top + 16 * i, WIDTH - 138, top + 16 * i + 12], fill=colour)
        draw.text((WIDTH - 132, top + 16 * i), state, fill="black")
    for t, kind in faults:
        draw.line([x(t), MARGIN - 10, x(t), height - 20], fill=(214, 39, 40), width=1)
        draw.text((x(t) + 2, MARGIN - 22), kind, fill=(214, 39, 40))
    image.save(path)


def _num(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _panel(draw: ImageDraw.ImageDraw, title: str, top: int, series: dict[str, list[tuple[float, float | None]]],
           x) -> None:
    values = [v for points in series.values() for _, v in points if v is not None]
    high = max(values, default=1.0) * 1.1 or 1.0
    draw.rectangle([MARGIN, top, WIDTH - MARGIN - 160, top + PANEL], outline="black")
    draw.text((MARGIN, top - 16), title, fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = top + PANEL - frac * PANEL
        draw.text((5, y - 6), f"{high * frac:.4g}", fill="black")

    def y(v: float) -> float:
        return top + PANEL - v / high * PANEL

    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        known = [(t, v) for t, v in points if v is not None]
        if len(known) > 1:
            draw.line([(x(t), y(v)) for t, v in known], fill=colour, width=2)
        draw.text((WIDTH - MARGIN - 150, top + 14 * i), name, fill=colour)
