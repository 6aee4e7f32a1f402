"""Pre-processing against transformers' CLIPImageProcessor, and bad input to the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor

from model import ModelInputError, SlowFastVLM, VideoQuery
from model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_frames
from model.random_checkpoint import write_random_checkpoint
from tests.support.random_model import random_frames


def smooth_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Natural-ish images: smooth gradients plus texture, so resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for _ in range(count):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6)]
        base = np.stack([np.sin(x * fx + phase), np.cos(y * fy), np.sin((x + y) * fx * 0.5)], -1)
        noise = rng.normal(0, 0.15, (height, width, 3))
        frames.append(np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8))
    return np.stack(frames)


@pytest.mark.parametrize("height, width", [(480, 640), (479, 641), (1080, 720), (576, 576), (300, 400)])
def test_preprocess_matches_clip_image_processor(height, width):
    frames = smooth_frames(3, height, width)
    ours = preprocess_frames(frames, 576)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 576},
        crop_size={"height": 576, "width": 576},
        do_center_crop=True,
        resample=3,  # bicubic, as the official processor
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    theirs = torch.as_tensor(np.asarray(processor([f for f in frames], return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape == (3, 3, 576, 576)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    mean_abs_diff = ((ours - theirs) * std).abs().mean().item()  # in [0, 1] pixel units
    assert mean_abs_diff < 1 / 255, mean_abs_diff


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((0, 576, 576, 3), np.uint8), r"frames are empty: shape \(0, 576, 576, 3\)"),
        (np.zeros((2, 64, 64, 3), np.float32), "frames must be uint8 RGB, got dtype torch.float32"),
        (np.zeros((2, 64, 64, 4), np.uint8), r"3 channels .* got shape \(2, 64, 64, 4\)"),
        (np.zeros((2, 3, 64, 64, 3), np.uint8), r"shape \[T, H, W, 3\], got \(2, 3, 64, 64, 3\)"),
        ([[1, 2, 3]], "numpy array or torch tensor, got list"),
    ],
)
def test_bad_frames_are_rejected(tiny_vlm, frames, message):
    with pytest.raises(ModelInputError, match=message):
        tiny_vlm.preprocess(frames)
    with pytest.raises(ModelInputError, match=message):
        tiny_vlm.generate([VideoQuery(frames=frames, question="q")], max_new_tokens=2)


def test_torch_frames_are_accepted(tiny_vlm):
    frames = random_frames(2)
    torch.testing.assert_close(tiny_vlm.preprocess(torch.from_numpy(frames)), tiny_vlm.preprocess(frames))


def test_bad_features_and_pixels_are_rejected(tiny_vlm):
    with pytest.raises(ModelInputError, match=r"features must be \[T, 81, 64\] .* got \(4, 80, 64\)"):
        tiny_vlm.generate([VideoQuery(features=torch.zeros(4, 80, 64), question="q")])
    with pytest.raises(ModelInputError, match=r"pixels must be a float tensor \[T, 3, 576, 576\] .* got \(2, 3, 64, 64\)"):
        tiny_vlm.encode_frames(torch.zeros(2, 3, 64, 64))


@pytest.mark.parametrize(
    "question, message",
    [
        ("", "question is empty"),
        ("   ", "question is empty"),
        (None, "question must be a string, got NoneType"),
        ("what is <image> here", "must not contain the '<image>' placeholder"),
        ("x" * 20_000, "question is 20000 characters long; the limit is 16000"),
    ],
)
def test_bad_questions_are_rejected(tiny_vlm, question, message):
    with pytest.raises(ModelInputError, match=message):
        tiny_vlm.generate([VideoQuery(frames=random_frames(2), question=question)])


def test_query_needs_exactly_one_visual_input():
    with pytest.raises(ModelInputError, match="exactly one of frames= or features="):
        VideoQuery(question="q")
    with pytest.raises(ModelInputError, match="exactly one of frames= or features="):
        VideoQuery(question="q", frames=random_frames(1), features=torch.zeros(1, 81, 64))


def test_empty_query_list_is_rejected(tiny_vlm):
    with pytest.raises(ModelInputError, match="no queries given"):
        tiny_vlm.generate([])


def test_question_longer_than_the_context(tmp_path):
    folder = write_random_checkpoint(tmp_path / "short-context", max_position_embeddings=1400,
                                     tokenizer_model_max_length=1400)
    vlm = SlowFastVLM.from_pretrained(folder)
    frames = random_frames(64)  # 1296 fast tokens leave ~40 tokens for text and answer
    with pytest.raises(ModelInputError, match=r"prompt is \d+ tokens \(1296 fast visual \+ \d+ text\), more than the context allows \(1336"):
        vlm.generate([VideoQuery(frames=frames, question="describe the loading bay " * 20)], max_new_tokens=64)


def test_model_without_tokenizer_says_so(tiny_model_dir):
    vlm = SlowFastVLM.from_config(tiny_model_dir / "config.json", device="cpu")
    with pytest.raises(ModelInputError, match="no tokenizer"):
        vlm.generate([VideoQuery(frames=random_frames(2), question="q")])
