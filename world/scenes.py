"""The synthetic world the shipped small model was trained on: coloured shapes that move.

One module renders it for training (`world.train`), for the demo clip and for the
semantic tests, so all three agree on what a scene is and how it is captioned.

- A scene has one or two objects (distinct colour+shape pairs, never overlapping), each
  8-25% of the frame's shorter side, on a dark solid, gradient or noisy background.
- Each object moves left, right, up or down by 30-55% of the visible square over the
  scene, or stays still. Geometry lives in the centre square of the frame, which is what
  the model sees after its shortest-edge resize and centre crop; the background fills the
  whole frame, whatever its size or aspect.
- Frames go through H.264 as a real file would.
- Captions follow a fixed grammar, objects in colour-then-shape order:
  "a red circle moves left and a blue square stays still."
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS: dict[str, tuple[int, int]] = {  # verb -> unit direction (x right, y down)
    "moves left": (-1, 0),
    "moves right": (1, 0),
    "moves up": (0, -1),
    "moves down": (0, 1),
    "stays still": (0, 0),
}
KINDS = [(colour, shape) for colour in COLOURS for shape in SHAPES]  # the 15 object kinds
BACKGROUNDS = ("solid", "gradient", "noise")
# Frame sizes (width, height) clips are rendered at: landscape, portrait, square, and
# some smaller than the model input so upscaling is seen too.
FRAME_SIZES = [(160, 120), (176, 144), (256, 144), (320, 180), (320, 240), (384, 216), (480, 270),
               (480, 360), (640, 360), (360, 640), (240, 320), (400, 400)]
MIN_SIZE, MAX_SIZE = 0.08, 0.25  # object size, fraction of the shorter side
MIN_TRAVEL, MAX_TRAVEL = 0.30, 0.55  # travel of a moving object, fraction of the visible square
# The model `python -m world.train` trains on this world, shipped in the package, and the
# name its config.json carries (`slowfast_stream_model`).
SHIPPED_MODEL = Path(__file__).with_name("checkpoint")
MARKER = "small synthetic-world model"


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    motion: str
    size: float  # fraction of the visible square's side
    start: tuple[float, float]  # centre (x, y) at the first frame, fractions of the visible square
    end: tuple[float, float]  # centre at the last frame
    tint: tuple[int, int, int] = (0, 0, 0)  # small per-object colour jitter

    @property
    def kind(self) -> tuple[str, str]:
        return self.colour, self.shape

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"

    def centre(self, progress: float) -> tuple[float, float]:
        return (self.start[0] + (self.end[0] - self.start[0]) * progress,
                self.start[1] + (self.end[1] - self.start[1]) * progress)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str
    palette: tuple[tuple[int, int, int], tuple[int, int, int]]  # background colours
    seed: int  # drives the background noise

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects) + "."

    def has(self, colour: str, shape: str) -> bool:
        return any(o.kind == (colour, shape) for o in self.objects)


def caption_for(objects: Sequence[WorldObject]) -> str:
    return Scene(tuple(objects), "solid", ((0, 0, 0), (0, 0, 0)), 0).caption


def yes_no_question(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape}?"


_PHRASE = re.compile(r"\ban? (\w+) (\w+) (" + "|".join(MOTIONS) + r")")


def parse_caption(text: str) -> list[tuple[str, str, str]]:
    """(colour, shape, motion) of each object phrase in a caption of the world's grammar."""
    return [match.groups() for match in _PHRASE.finditer(text)]


REVERSED_MOTION = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
                   "moves down": "moves up", "stays still": "stays still"}


def reversed_scene(scene: Scene) -> Scene:
    """The same scene played backwards: every motion turns round."""
    objects = tuple(WorldObject(o.colour, o.shape, REVERSED_MOTION[o.motion], o.size, o.end, o.start, o.tint)
                    for o in scene.objects)
    return Scene(objects, scene.background, scene.palette, scene.seed)


MIRRORED_MOTION = REVERSED_MOTION | {"moves up": "moves up", "moves down": "moves down"}


def mirrored_scene(scene: Scene) -> Scene:
    """The scene seen in a mirror (left and right swapped)."""
    objects = tuple(WorldObject(o.colour, o.shape, MIRRORED_MOTION[o.motion], o.size, (1 - o.start[0], o.start[1]),
                                (1 - o.end[0], o.end[1]), o.tint) for o in scene.objects)
    return Scene(objects, scene.background, scene.palette, scene.seed)


def _random_object(rng: np.random.Generator, kind: tuple[str, str], motion: str) -> WorldObject:
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    low, high = size / 2 + 0.02, 1 - size / 2 - 0.02
    dx, dy = MOTIONS[motion]
    travel = float(rng.uniform(MIN_TRAVEL, min(MAX_TRAVEL, high - low)))
    start = [float(rng.uniform(low, high)), float(rng.uniform(low, high))]
    for axis, direction in ((0, dx), (1, dy)):
        if direction > 0:
            start[axis] = float(rng.uniform(low, high - travel))
        elif direction < 0:
            start[axis] = float(rng.uniform(low + travel, high))
    end = (start[0] + dx * travel, start[1] + dy * travel)
    tint = tuple(int(v) for v in rng.integers(-15, 16, 3))
    return WorldObject(kind[0], kind[1], motion, size, (start[0], start[1]), end, tint)


def _apart(a: WorldObject, b: WorldObject, steps: int = 16) -> bool:
    """The two objects never touch over the scene (with a margin)."""
    reach = (a.size + b.size) / 2 * 1.5
    for i in range(steps):
        p = i / (steps - 1)
        (ax, ay), (bx, by) = a.centre(p), b.centre(p)
        if max(abs(ax - bx), abs(ay - by)) < reach:
            return False
    return True


def random_scene(rng: np.random.Generator, objects: int | None = None,
                 kinds: Sequence[tuple[str, str]] | None = None) -> Scene:
    """A random scene; `kinds` fixes which objects appear (their motions stay random)."""
    count = len(kinds) if kinds is not None else (objects or int(rng.integers(1, 3)))
    while True:
        chosen = list(kinds) if kinds is not None else [KINDS[i] for i in rng.choice(len(KINDS), count, replace=False)]
        motions = list(MOTIONS)
        placed = [_random_object(rng, kind, motions[int(rng.integers(len(motions)))]) for kind in chosen]
        if len(placed) < 2 or _apart(placed[0], placed[1]):
            break
    placed.sort(key=lambda o: (list(COLOURS).index(o.colour), SHAPES.index(o.shape)))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    palette = (tuple(int(v) for v in rng.integers(0, 70, 3)), tuple(int(v) for v in rng.integers(0, 90, 3)))
    return Scene(tuple(placed), background, palette, int(rng.integers(2**31)))


def _background(scene: Scene, width: int, height: int) -> np.ndarray:
    first, second = (np.array(c, np.float32) for c in scene.palette)
    if scene.background == "gradient":
        rng = np.random.default_rng(scene.seed)
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = x / width * np.cos(angle) + y / height * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        return first + ramp[..., None] * (second - first)
    return np.broadcast_to(first, (height, width, 3)).copy()


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Pixels inside the shape; coordinates in pixels of the frame."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    # upright isosceles triangle in the same box: apex at the top, base at the bottom
    inside_rows = (ys >= cy - half) & (ys <= cy + half)
    half_width = (ys - (cy - half)) / 2  # grows from 0 at the apex to `half` at the base
    return inside_rows & (np.abs(xs - cx) <= half_width)


def render_frames(scene: Scene, width: int, height: int, frames: int,
                  progress: Sequence[float] | None = None) -> np.ndarray:
    """uint8 RGB frames [frames, height, width, 3]; frame i is at progress[i] in [0, 1]."""
    if progress is None:
        progress = [i / max(frames - 1, 1) for i in range(frames)]
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    base = _background(scene, width, height)
    noise_rng = np.random.default_rng(scene.seed + 1)
    out = np.empty((len(progress), height, width, 3), np.uint8)
    for index, p in enumerate(progress):
        image = base.copy()
        if scene.background == "noise":
            image += noise_rng.normal(0, 8, (height, width, 1)).astype(np.float32)
        for obj in scene.objects:
            fx, fy = obj.centre(p)
            cx, cy, half = left + fx * side, top + fy * side, obj.size * side / 2
            x0, x1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, width)
            y0, y1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, height)
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            mask = _shape_mask(obj.shape, xs, ys, cx, cy, half)
            colour = np.clip(np.array(COLOURS[obj.colour]) + np.array(obj.tint), 0, 255).astype(np.float32)
            image[y0:y1, x0:x1][mask] = colour
        out[index] = np.clip(image, 0, 255).astype(np.uint8)
    return out


def h264_roundtrip(frames: np.ndarray, crf: int = 26, fps: int = 4) -> list[av.VideoFrame]:
    """Encode RGB frames with libx264 and decode them again: the artefacts a file would have."""
    height, width = frames.shape[1:3]
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, fps)
    encoder.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(crf), "threads": "1"}
    decoder = av.CodecContext.create("h264", "r")
    decoded: list[av.VideoFrame] = []
    for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        for packet in encoder.encode(frame):
            decoded.extend(decoder.decode(packet))
    for packet in encoder.encode(None):
        decoded.extend(decoder.decode(packet))
    decoded.extend(decoder.decode(None))
    return decoded


def model_view(frames: Sequence[av.VideoFrame], size: int) -> np.ndarray:
    """Shortest edge to `size` (swscale bicubic, as the pipeline's sources do), centre crop."""
    out = []
    for frame in frames:
        scale = size / min(frame.width, frame.height)
        width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
        rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray()
        top, left = (height - size) // 2, (width - size) // 2
        out.append(rgb[top : top + size, left : left + size])
    return np.stack(out)


@dataclass(frozen=True)
class RenderedClip:
    scene: Scene
    frames: np.ndarray  # uint8 [T, size, size, 3] as the model sees them
    frame_size: tuple[int, int]  # (width, height) it was rendered and compressed at


def render_clip(seed: int, frames: int, size: int, scene: Scene | None = None) -> RenderedClip:
    """One clip, fully determined by `seed`: random scene, frame size and compression."""
    rng = np.random.default_rng(seed)
    scene = scene or random_scene(rng)
    width, height = FRAME_SIZES[int(rng.integers(len(FRAME_SIZES)))]
    crf = int(rng.integers(20, 34))
    decoded = h264_roundtrip(render_frames(scene, width, height, frames), crf=crf)
    return RenderedClip(scene, model_view(decoded, size), (width, height))


def write_scene_file(path: Path, scenes: Sequence[Scene], seconds_per_scene: float = 4.0, fps: int = 8,
                     size: tuple[int, int] = (480, 270)) -> Path:
    """An H.264 mp4 showing `scenes` one after another, `seconds_per_scene` each."""
    width, height = size
    per_scene = round(seconds_per_scene * fps)
    # Each scene's motion spans its sampled frames: progress of the last frame is 1.
    progress = [i / (per_scene - 1) for i in range(per_scene)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for scene in scenes:
            for image in render_frames(scene, width, height, per_scene, progress):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path

