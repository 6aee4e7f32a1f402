"""The scene gate on the synthetic world through H.264: noise and compression flicker never
count as change, the smallest object entering always does, and a static scene is refreshed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gate import DEFAULT_THRESHOLD, SceneGate, change_score, thumbnail
from world.scenes import COLOURS, MIN_SIZE, Scene, WorldObject, h264_roundtrip, model_view, render_frames

MODEL_SIZE = 224


def seen(scene: Scene, frames: int = 8) -> list[np.ndarray]:
    """Thumbnails of the scene as the pipeline samples it: rendered, H.264, model view."""
    return [thumbnail(f) for f in model_view(h264_roundtrip(render_frames(scene, 320, 180, frames)), MODEL_SIZE)]


def backgrounds(count: int):
    rng = np.random.default_rng(7)
    for seed in range(count):
        palette = tuple(tuple(int(x) for x in rng.integers(0, 256, 3)) for _ in range(2))
        for background in ("noise", "gradient", "solid"):
            yield Scene((), background, palette, seed)


def test_noise_floor_and_the_smallest_entering_object_are_on_either_side_of_the_threshold():
    floor, smallest = 0.0, 1.0
    for static in backgrounds(4):
        empty = seen(static)
        floor = max(floor, *(change_score(empty[0], t) for t in empty[1:]))
        for colour in COLOURS:
            circle = WorldObject(colour, "circle", "stays still", MIN_SIZE, (0.3, 0.6), (0.3, 0.6), (0, 0, 0))
            visited = seen(Scene((circle,), static.background, static.palette, static.seed), frames=2)
            smallest = min(smallest, change_score(empty[0], visited[1]))
    print(f"noise floor {floor:.4f}, smallest object entering {smallest:.4f}, threshold {DEFAULT_THRESHOLD}")
    assert floor < DEFAULT_THRESHOLD < smallest


def test_a_static_scene_is_gated_and_refreshed_every_n_windows_and_a_visit_is_sent_at_once():
    static = Scene((), "noise", ((90, 110, 120), (0, 0, 0)), 3)
    frames = seen(static, frames=24)
    gate = SceneGate(refresh_every=10)
    sent = [gate.decide(frames[i : i + 2]).send for i in range(0, 24, 2)]
    # the first window, then 1 in 10 (the first is a change from nothing: the next one settles)
    assert sent == [True, True] + [False] * 9 + [True]
    visitor = WorldObject("red", "circle", "stays still", MIN_SIZE, (0.5, 0.5), (0.5, 0.5), (0, 0, 0))
    visit = seen(Scene((visitor,), "noise", static.palette, 3), frames=6)
    decision = gate.decide(visit[:2])
    assert decision.send and decision.score > DEFAULT_THRESHOLD
    assert gate.decide(visit[2:4]).send  # the window after a change: all of it shows the visit
    assert not gate.decide(visit[4:6]).send  # then the visit is a static scene of its own
    assert gate.decide(frames[:2]).send  # it leaving is a change too


@pytest.mark.parametrize("shape", [(240, 320, 3), (17, 50, 3)])
def test_thumbnails_of_any_frame_size(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    thumb = thumbnail(image)
    assert thumb.shape == (min(32, shape[0]), min(32, shape[1]), 3) and thumb.dtype == np.float32
