"""The clip of `slowfast demo`: scenes of the synthetic world the shipped small model knows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from world.scenes import Scene, random_scene, write_scene_file

SCENE_SECONDS = 4.0  # one 16-frame window at 4 fps
DEMO_SEED = 2026
RED_CIRCLE = ("red", "circle")
RED_CIRCLE_SCENES = (1, 3, 4)  # scenes where the standing question should fire


def demo_scenes(count: int = 6, seed: int = DEMO_SEED, red_circle_in: tuple[int, ...] = RED_CIRCLE_SCENES) -> list[Scene]:
    """Fixed random scenes; a red circle appears in the scenes `red_circle_in` and nowhere else."""
    rng = np.random.default_rng(seed)
    scenes = []
    for index in range(count):
        while True:
            scene = random_scene(rng)
            if scene.has(*RED_CIRCLE) == (index in red_circle_in):
                break
        scenes.append(scene)
    return scenes


def write_clip(path: Path, scenes: list[Scene]) -> Path:
    return write_scene_file(path, scenes, seconds_per_scene=SCENE_SECONDS, fps=8, size=(640, 360))
