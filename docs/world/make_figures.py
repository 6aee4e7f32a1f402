"""README figures: the demo's scenes (first, middle and last frame of each 4 s scene) beside
what the shipped small model says about them. `.venv/bin/python docs/world/make_figures.py`"""

from __future__ import annotations

import tempfile
from pathlib import Path

import av
import numpy as np

from model import SlowFastVLM, VideoQuery
from pipeline.config import DEFAULT_CAPTION_PROMPT
from pipeline.demo_clip import RED_CIRCLE, demo_scenes, write_clip
from world.scenes import SHIPPED_MODEL, model_view

HERE = Path(__file__).parent


def save_png(path: Path, rgb: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "rgb24"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")), *stream.encode()]:
            out.mux(packet)


def main() -> None:
    vlm = SlowFastVLM.from_pretrained(SHIPPED_MODEL, device="cpu")
    scenes = demo_scenes()
    with tempfile.TemporaryDirectory() as tmp:
        with av.open(str(write_clip(Path(tmp) / "demo.mp4", scenes))) as container:
            frames = list(container.decode(video=0))[::2]  # the 8 fps file read at 4 fps, as the demo does
    question = f"Is there a {' '.join(RED_CIRCLE)}?"
    print("| scene | frames 0, 8, 15 | caption | P(yes): " + question + " | truth |\n|---|---|---|---|---|")
    for index, scene in enumerate(scenes):
        window = frames[16 * index : 16 * index + 16]
        seen = model_view(window, vlm.config.image_size)
        features = vlm.encode_frames(vlm.preprocess(seen))
        caption = vlm.generate([VideoQuery(DEFAULT_CAPTION_PROMPT, features=features)], max_new_tokens=32)[0].text
        p_yes = vlm.yes_probability(VideoQuery(question, features=features))
        shown = [window[i].reformat(width=160, height=90, format="rgb24").to_ndarray() for i in (0, 8, 15)]
        gap = np.full((90, 4, 3), 255, np.uint8)
        save_png(HERE / f"scene-{index}.png", np.concatenate([shown[0], gap, shown[1], gap, shown[2]], 1))
        print(f"| {index} | ![scene {index}](docs/world/scene-{index}.png) | `{caption}` | {p_yes:.2f} | {scene.caption} |")


if __name__ == "__main__":
    main()
