"""The shipped small model through the whole pipeline: each window's results describe that window.

A file made of 4 s scenes of the synthetic world, read with 16-frame windows every 16
frames at 4 fps, so window i is exactly scene i. No --model is given: the default is the
small synthetic-world model shipped with the package.
"""

from __future__ import annotations

from connectors.client import SlowFastClient
from connectors.redis_schema import EventPhase
from pipeline.config import load_config
from pipeline.demo_clip import SCENE_SECONDS, demo_scenes
from pipeline.runner import run_pipeline
from world.scenes import MARKER, parse_caption, write_scene_file

RED_CIRCLE_SCENES = (1, 2, 4)  # the scenes that show a red circle; the standing question asks for one


def test_captions_and_events_follow_the_scenes(ray_session, redis_url, tmp_path):
    scenes = demo_scenes(count=6, seed=11, red_circle_in=RED_CIRCLE_SCENES)
    clip = write_scene_file(tmp_path / "scenes.mp4", scenes, seconds_per_scene=SCENE_SECONDS, fps=8)
    # close_after 1: each visit of the red circle is an event of its own
    question = {"id": "red-circle", "prompt": "Is there a red circle?",
                "trigger": {"p_yes_above": 0.5, "close_after": 1}}
    config = load_config(
        None, redis_url=redis_url, out_dir=tmp_path / "out", window=16, stride=16, fps=4.0,
        streams=[{"id": "scenes", "source": str(clip), "standing_questions": [question]}],
        generation={"max_new_tokens": 32},
    )
    events: list[str] = []
    summaries = run_pipeline(config, on_event=events.append)
    assert summaries["scenes"].state == "ended"
    assert sum(MARKER in line for line in events) == 1

    client = SlowFastClient(redis_url)
    captions = client.history("scenes")
    assert [c.window for c in captions] == list(range(len(scenes)))
    # Window i's caption names scene i's objects, in all windows but at most one: the model
    # names exactly the objects of 98% of fresh clips. A caption of a neighbouring window,
    # or of no window, fails here, since neighbouring scenes show different objects.
    assert all({o.kind for o in a.objects} != {o.kind for o in b.objects} for a, b in zip(scenes, scenes[1:]))
    exact = 0
    for caption, scene in zip(captions, scenes):
        named = {(colour, shape) for colour, shape, _ in parse_caption(caption.text)}
        exact += named == {o.kind for o in scene.objects}
    assert exact >= len(scenes) - 1, [(c.window, c.text, s.caption) for c, s in zip(captions, scenes)]

    records = client.events("scenes")
    fired = [e for e in records if e.phase != EventPhase.CLOSED]
    assert [e.window for e in fired] == list(RED_CIRCLE_SCENES)
    assert all(e.question_id == "red-circle" and e.probability > 0.5 for e in fired)
    # scenes 1-2 and 4: two visits, two events, each closed by the first scene without the circle
    assert [(e.window, e.phase, e.first_window) for e in records] == [
        (1, "opened", 1), (2, "updated", 1), (3, "closed", 1), (4, "opened", 4), (5, "closed", 4)]
    assert len({e.event_id for e in records}) == 2
    assert all(e.probability <= 0.5 for e in records if e.phase == EventPhase.CLOSED)
