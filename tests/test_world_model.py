"""The synthetic world and the training script of the small synthetic-world model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model import SlowFastVLM
from world.scenes import (
    COLOURS,
    FRAME_SIZES,
    MARKER,
    MOTIONS,
    SHAPES,
    SHIPPED_MODEL,
    parse_caption,
    random_scene,
    render_clip,
    render_frames,
    mirrored_scene,
    reversed_scene,
)
from world.train import (
    BAR,
    EVAL_SEED_BASE,
    VALIDATION_SEED_BASE,
    TrainSettings,
    evaluate,
    train,
)


def test_scenes_follow_the_rules_of_the_world():
    rng = np.random.default_rng(5)
    for _ in range(200):
        scene = random_scene(rng)
        assert 1 <= len(scene.objects) <= 2
        assert len({o.kind for o in scene.objects}) == len(scene.objects)
        for obj in scene.objects:
            assert obj.colour in COLOURS and obj.shape in SHAPES and obj.motion in MOTIONS
            assert 0.08 <= obj.size <= 0.25
            travel = np.subtract(obj.end, obj.start)
            direction = MOTIONS[obj.motion]
            if direction == (0, 0):
                assert not travel.any()
            else:  # at least a quarter of the frame, along the named direction only
                along, across = float(np.dot(travel, direction)), travel[0] * direction[1] - travel[1] * direction[0]
                assert along >= 0.25 and across == 0
            for point in (obj.start, obj.end):  # the whole object stays in the visible square
                assert all(obj.size / 2 <= c <= 1 - obj.size / 2 for c in point)
        assert parse_caption(scene.caption) == [(o.colour, o.shape, o.motion) for o in scene.objects]
        assert scene.caption.startswith("a ") and scene.caption.endswith(".")
        assert [o.motion for o in reversed_scene(reversed_scene(scene)).objects] == [o.motion for o in scene.objects]
        for obj, mirrored in zip(scene.objects, mirrored_scene(scene).objects):  # left and right swap, nothing else
            assert np.allclose(np.subtract(mirrored.end, mirrored.start), np.multiply(np.subtract(obj.end, obj.start), (-1, 1)))
            assert MOTIONS[mirrored.motion] == (-MOTIONS[obj.motion][0], MOTIONS[obj.motion][1])


def test_objects_are_drawn_where_the_scene_says_in_any_frame_size():
    scene = random_scene(np.random.default_rng(3), kinds=[("red", "square")])
    obj = scene.objects[0]
    for width, height in FRAME_SIZES:
        frames = render_frames(scene, width, height, 2)
        side = min(width, height)
        for frame, progress in zip(frames, (0.0, 1.0)):
            x, y = obj.centre(progress)
            px, py = int((width - side) / 2 + x * side), int((height - side) / 2 + y * side)
            assert tuple(frame[py, px]) == tuple(np.clip(np.add(COLOURS["red"], obj.tint), 0, 255))


def test_clips_are_deterministic_and_model_sized():
    first, again = render_clip(42, 4, 128), render_clip(42, 4, 128)
    assert first.frames.shape == (4, 128, 128, 3) and first.frames.dtype == np.uint8
    assert np.array_equal(first.frames, again.frames) and first.scene == again.scene


def test_training_is_deterministic_and_writes_an_official_checkpoint(tmp_path):
    small = TrainSettings(clips=3, vision_steps=2, vision_batch=4, language_steps=2, language_batch=2, check_every=1,
                          check_clips=1, workers=1)
    one, two = train(tmp_path / "one", small), train(tmp_path / "two", small)
    weights = "model-00001-of-00001.safetensors"
    assert (one / weights).read_bytes() == (two / weights).read_bytes()
    vlm = SlowFastVLM.from_pretrained(one, device="cpu")  # the released checkpoints' loading path
    assert vlm.config.model_type == "llava_qwen_slow_fast"
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in one.iterdir()}
    accuracy = evaluate(vlm, count=2)  # the evaluation runs end to end on fresh clips
    assert accuracy.clips == 2 and accuracy.objects >= 2


def test_evaluation_clips_never_were_training_clips():
    assert TrainSettings().clips <= EVAL_SEED_BASE and TrainSettings().check_clips <= VALIDATION_SEED_BASE - EVAL_SEED_BASE


def test_the_shipped_model_describes_fresh_clips_well_enough():
    """The model `slowfast run` serves by default, against its bar, on clips whose seeds training never used."""
    vlm = SlowFastVLM.from_pretrained(SHIPPED_MODEL, device="cpu")  # the released checkpoints' loading path
    assert json.loads((SHIPPED_MODEL / "config.json").read_text())["slowfast_stream_model"] == MARKER
    assert sum(f.stat().st_size for f in SHIPPED_MODEL.iterdir()) <= 10_000_000
    accuracy = evaluate(vlm, count=100)
    assert accuracy.passes(), f"{accuracy.summary()}; bar {BAR}"
