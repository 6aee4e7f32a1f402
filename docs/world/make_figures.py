"""README figures: the demo's scenes (first, middle and last frame of each 4 s scene) and what
the shipped small model says about them. `.venv/bin/python docs/world/make_figures.py`"""

from __future__ import annotations

import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

from model import SlowFastVLM, VideoQuery
from model.synthetic_world import SHIPPED_MODEL, model_view
from pipeline.config import DEFAULT_CAPTION_PROMPT
from pipeline.demo_clip import RED_CIRCLE, demo_scenes, write_clip

HERE = Path(__file__).parent


def main() -> None:
    vlm = SlowFastVLM.from_pretrained(SHIPPED_MODEL, device="cpu")
    scenes = demo_scenes()
    with tempfile.TemporaryDirectory() as tmp:
        with av.open(str(write_clip(Path(tmp) / "demo.mp4", scenes))) as container:
            frames = list(container.decode(video=0))[::2]  # 8 fps file read at 4 fps, as the demo does
    question = f"Is there a {' '.join(RED_CIRCLE)}?"
    for index, scene in enumerate(scenes):
        window = frames[16 * index : 16 * index + 16]
        seen = model_view(window, vlm.config.image_size)
        caption = vlm.generate([VideoQuery(DEFAULT_CAPTION_PROMPT, frames=seen)], max_new_tokens=32)[0].text
        p_yes = vlm.yes_probability(VideoQuery(question, frames=seen))
        shown = [window[i].reformat(width=160, height=90, format="rgb24").to_ndarray() for i in (0, 8, 15)]
        gap = np.full((90, 4, 3), 255, np.uint8)
        Image.fromarray(np.concatenate([shown[0], gap, shown[1], gap, shown[2]], 1)).save(
            HERE / f"scene-{index}.png", optimize=True)
        print(f"| {index} | ![scene {index}](docs/world/scene-{index}.png) | `{caption}` | {p_yes:.2f} | {scene.caption} |")


if __name__ == "__main__":
    main()
