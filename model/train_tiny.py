"""Train the small synthetic-world Slow-Fast model: `python -m model.train_tiny OUT`.

Deterministic (fixed seeds, fixed thread count) and sized for 2 CPU cores. It renders its
own clips (`model.synthetic_world`), then trains the same network, config format and
loading path as a released checkpoint, at small sizes, in two stages:

1. Vision: the ConvNeXt tower and projector learn from single frames through a
   temporary probe on each pooled token (which object kinds have their centre in that
   quarter of the frame, and where). The probe is not part of the checkpoint.
2. Language: with the tower frozen, its per-frame outputs are computed once and cached;
   the projector and the LLM then learn the captions and yes/no answers with the
   official prompt, token layout and cross-attention rule (prompt text only), through
   the same reference forward that checks cached decoding.

The result is an official-format checkpoint folder (config.json, safetensors, tokenizer).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import generation
from .api import SlowFastVLM, VideoQuery, load_tokenizer
from .config import SlowFastConfig
from .modeling import SlowFastForCausalLM
from .preprocess import preprocess_frames
from .prompt import END_OF_TURN, build_prompt
from .synthetic_world import (
    COLOURS,
    KINDS,
    SHAPES,
    MOTIONS,
    RenderedClip,
    Scene,
    parse_caption,
    render_clip,
    reversed_scene,
    yes_no_question,
)
from .tiny import TINY_CONFIG, config_with_tokens, write_checkpoint, write_tokenizer
from .visual_tokens import pool_frames, video_tokens

log = logging.getLogger("train_tiny")

# Prompts the model captions for; the first is the pipeline's default caption prompt.
CAPTION_PROMPTS = (
    "Please describe this video in detail.",
    "Describe this video.",
    "What happens in this video?",
    "Describe the clip.",
)
FRAMES = 16  # one 4 s window at 4 fps
EVAL_SEED_BASE = 1_000_000  # evaluation clips use seeds from here; training uses 0..clips-1
MARKER = "small synthetic-world model"
MIN_COVERAGE = 0.2  # a pooled token is taught an object when it covers this much of the object's box

WORLD_CONFIG: dict[str, Any] = TINY_CONFIG | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tokenizer_model_max_length": 2048,
    "mm_hidden_size": 48,
    "vision_config": {"depths": [1, 1, 1, 1], "dims": [12, 24, 32, 48], "norm_eps": 1e-5, "image_size": 128},
    "slowfast_stream_model": MARKER,
}


@dataclass(frozen=True)
class TrainSettings:
    clips: int = 450
    vision_steps: int = 400
    vision_batch: int = 32
    language_steps: int = 700
    language_batch: int = 32
    seed: int = 0
    workers: int = 2


def world_corpus(seed: int = 0, lines: int = 400) -> list[str]:
    """Text the tokenizer is trained on: the chat template, prompts, captions, questions."""
    rng = np.random.default_rng(seed)
    corpus = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
              "<|im_start|>assistant\n", "Yes", "No", *CAPTION_PROMPTS]
    motions = list(MOTIONS)
    for _ in range(lines):
        colour, shape = KINDS[int(rng.integers(len(KINDS)))]
        corpus.append(f"a {colour} {shape} {motions[int(rng.integers(len(motions)))]} and")
        corpus.append(yes_no_question(colour, shape))
    return corpus


# ---- data -----------------------------------------------------------------------

def _render(seed: int) -> RenderedClip:
    return render_clip(seed, FRAMES, WORLD_CONFIG["vision_config"]["image_size"])


def render_clips(seeds: range, workers: int) -> list[RenderedClip]:
    if workers <= 1:
        return [_render(s) for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_render, seeds, chunksize=32))


def probe_targets(scenes: list[Scene], progress: torch.Tensor, flipped: torch.Tensor, grid: int):
    """What each pooled token covers: colour and shape (0 = none) of the object with the most area
    in that part of the frame [B, grid^2], and that object's centre [B, grid^2, 2]."""
    batch = len(scenes)
    colour = torch.zeros(batch, grid * grid, dtype=torch.long)
    shape = torch.zeros(batch, grid * grid, dtype=torch.long)
    where = torch.zeros(batch, grid * grid, 2)
    best = torch.full((batch, grid * grid), MIN_COVERAGE)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            x, y = obj.centre(float(progress[b]))
            if flipped[b]:
                x = 1 - x
            half = obj.size / 2
            for row in range(grid):
                for col in range(grid):
                    cell = row * grid + col
                    overlap_x = max(0.0, min(x + half, (col + 1) / grid) - max(x - half, col / grid))
                    overlap_y = max(0.0, min(y + half, (row + 1) / grid) - max(y - half, row / grid))
                    coverage = overlap_x * overlap_y / obj.size**2
                    if coverage > best[b, cell]:
                        best[b, cell] = coverage
                        colour[b, cell] = list(COLOURS).index(obj.colour) + 1
                        shape[b, cell] = SHAPES.index(obj.shape) + 1
                        where[b, cell] = torch.tensor([x, y])
    return colour, shape, where


def train_vision(network: SlowFastForCausalLM, clips: list[RenderedClip], settings: TrainSettings,
                 generator: torch.Generator) -> None:
    config = network.config
    grid = config.pooled_grid_size
    colours, shapes = len(COLOURS) + 1, len(SHAPES) + 1
    probe = nn.Linear(config.hidden_size, colours + shapes + 2)
    frame_probe = nn.Linear(config.mm_hidden_size, len(KINDS))  # which kinds the frame shows, from the tower's max
    params = [*network.model.vision_tower.parameters(), *network.model.mm_projector.parameters(), *probe.parameters(),
              *frame_probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = _cosine(optimizer, settings.vision_steps)
    started = time.monotonic()
    for step in range(settings.vision_steps):
        clip_ids = torch.randint(len(clips), (settings.vision_batch,), generator=generator)
        frame_ids = torch.randint(FRAMES, (settings.vision_batch,), generator=generator)
        flipped = torch.rand(settings.vision_batch, generator=generator) < 0.5
        images = np.stack([clips[c].frames[f] for c, f in zip(clip_ids.tolist(), frame_ids.tolist())])
        pixels = preprocess_frames(images, config.image_size)
        pixels = torch.where(flipped[:, None, None, None], pixels.flip(-1), pixels)
        colour, shape, where = probe_targets([clips[c].scene for c in clip_ids.tolist()], frame_ids / (FRAMES - 1),
                                             flipped, grid)
        tower = network.model.vision_tower(pixels)
        tokens = pool_frames(network.model.mm_projector(tower), config.mm_video_pooling_stride)
        out = probe(tokens)
        shown = torch.zeros(len(clip_ids), len(KINDS))
        for b, c in enumerate(clip_ids.tolist()):
            for obj in clips[c].scene.objects:
                shown[b, KINDS.index(obj.kind)] = 1
        frame_loss = F.binary_cross_entropy_with_logits(frame_probe(tower.max(1).values), shown)
        kind_loss = (F.cross_entropy(out[..., :colours].flatten(0, 1), colour.flatten())
                     + F.cross_entropy(out[..., colours : colours + shapes].flatten(0, 1), shape.flatten()))
        occupied = (colour > 0).float()
        position_loss = (((out[..., -2:] - where) ** 2).sum(-1) * occupied).sum() / occupied.sum().clamp(min=1)
        loss = 0.5 * kind_loss + position_loss + 4 * frame_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == settings.vision_steps - 1:
            correct = (out[..., :colours].argmax(-1) == colour) & (out[..., colours : colours + shapes].argmax(-1) == shape)
            log.info("vision step %d/%d: kind loss %.3f (tokens right %.0f%%) position %.4f frame %.3f (%.0f s)",
                     step + 1, settings.vision_steps, kind_loss.item(), 100 * correct.float().mean().item(),
                     position_loss.item(), frame_loss.item(), time.monotonic() - started)


@torch.no_grad()
def tower_outputs(network: SlowFastForCausalLM, clips: list[RenderedClip]) -> torch.Tensor:
    """Frozen tower outputs of every frame: [clips, frames, grid^2, mm_hidden] in float16."""
    size = network.config.image_size
    out = [network.model.vision_tower(preprocess_frames(clip.frames, size)).half() for clip in clips]
    return torch.stack(out)


class Texts:
    """Token ids of prompts and answers, computed once per distinct string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self._prompts: dict[str, Any] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt(self, question: str):
        if question not in self._prompts:
            self._prompts[question] = build_prompt(self.tokenizer, question)
        return self._prompts[question]

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end]
        return self._answers[text]


def pick_task(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer): a caption half of the time, else a balanced yes/no question."""
    if rng.random() < 0.5:
        return CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))], scene.caption
    if rng.random() < 0.5:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        return yes_no_question(*obj.kind), "Yes"
    # Absent kinds, often sharing the colour or the shape of a present object.
    absent = [k for k in KINDS if not scene.has(*k)]
    near = [k for k in absent if any(k[0] == o.colour or k[1] == o.shape for o in scene.objects)]
    pool = near if near and rng.random() < 0.7 else absent
    return yes_no_question(*pool[int(rng.integers(len(pool)))]), "No"


def train_language(network: SlowFastForCausalLM, texts: Texts, clips: list[RenderedClip], features: torch.Tensor,
                   settings: TrainSettings, generator: torch.Generator, rng: np.random.Generator) -> None:
    config = network.config
    for param in network.model.vision_tower.parameters():
        param.requires_grad_(False)
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = _cosine(optimizer, settings.language_steps)
    # The reference uncached forward (prompt + answer in one pass), without its inference_mode.
    forward = inspect.unwrap(generation.logits_without_cache)
    pad = texts.tokenizer.pad_token_id
    started = time.monotonic()
    for step in range(settings.language_steps):
        ids = torch.randint(len(clips), (settings.language_batch,), generator=generator).tolist()
        backwards = (torch.rand(settings.language_batch, generator=generator) < 0.5).tolist()
        grid_tokens = features[ids].float()  # [B, T, grid^2, C]
        grid_tokens = torch.stack([g.flip(0) if back else g for g, back in zip(grid_tokens, backwards)])
        batch, frames = grid_tokens.shape[:2]
        projected = network.model.mm_projector(grid_tokens.flatten(0, 1))
        pooled = pool_frames(projected, config.mm_video_pooling_stride).unflatten(0, (batch, frames))
        samples, answers = [], []
        for b, clip_id in enumerate(ids):
            scene = reversed_scene(clips[clip_id].scene) if backwards[b] else clips[clip_id].scene
            question, answer = pick_task(scene, rng)
            samples.append(generation.Sample(texts.prompt(question), video_tokens(pooled[b], config)))
            answers.append(texts.answer(answer))
        prompt_batch = generation.assemble(network, samples, context_limit=config.max_position_embeddings)
        longest = max(len(a) for a in answers)
        targets = torch.tensor([a + [pad] * (longest - len(a)) for a in answers])
        logits = forward(network, prompt_batch, targets, decode_cross_attention=False)[:, :longest]
        mask = torch.tensor([[1.0] * len(a) + [0.0] * (longest - len(a)) for a in answers])
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
        loss = (losses * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.language_steps - 1:
            log.info("language step %d/%d: loss %.4f (%.0f s)", step + 1, settings.language_steps, loss.item(),
                     time.monotonic() - started)


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 30) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(folder: Path, settings: TrainSettings = TrainSettings()) -> Path:
    if settings.clips > EVAL_SEED_BASE:
        raise ValueError(f"at most {EVAL_SEED_BASE} training clips: seeds from {EVAL_SEED_BASE} are for evaluation")
    torch.manual_seed(settings.seed)
    # One thread: deterministic, and no thread spinning when the machine is busy.
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    folder.mkdir(parents=True, exist_ok=True)
    token_ids = write_tokenizer(folder, world_corpus(settings.seed), vocab_size=384)
    config_dict = config_with_tokens(WORLD_CONFIG, token_ids)
    config = SlowFastConfig.from_source(config_dict)
    network = SlowFastForCausalLM(config)
    with torch.no_grad():  # cross-attention live from the start (a zero warm-up gate passes no gradient)
        for name, param in network.named_parameters():
            if name.endswith("cross_attn_warm_up_gate"):
                param.fill_(0.5)
    started = time.monotonic()
    clips = render_clips(range(settings.clips), settings.workers)
    log.info("rendered %d clips in %.0f s", len(clips), time.monotonic() - started)
    train_vision(network, clips, settings, generator)
    features = tower_outputs(network, clips)
    log.info("cached tower outputs %s (%.0f s so far)", tuple(features.shape), time.monotonic() - started)
    texts = Texts(load_tokenizer(folder))
    train_language(network, texts, clips, features, settings, generator, rng)
    write_checkpoint(folder, network, config_dict, token_ids, shards=1)
    log.info("trained in %.0f s; checkpoint %s", time.monotonic() - started, folder)
    return folder


# ---- evaluation -----------------------------------------------------------------

@dataclass(frozen=True)
class Accuracy:
    clips: int
    objects: int
    kind: float  # objects whose colour and shape the caption names
    motion: float  # objects named with their correct motion
    exact_objects: float  # captions naming exactly the scene's objects
    yes_no: float  # yes/no questions answered right (P(yes) > 0.5)

    def summary(self) -> str:
        return (f"{self.clips} fresh clips, {self.objects} objects: colour+shape {self.kind:.1%}, "
                f"motion {self.motion:.1%}, exact object set {self.exact_objects:.1%}, yes/no {self.yes_no:.1%}")


def evaluate(vlm: SlowFastVLM, count: int = 100, seed_base: int = EVAL_SEED_BASE, batch: int = 16) -> Accuracy:
    """Accuracy on `count` fresh clips (seeds from `seed_base`, disjoint from training's)."""
    rng = np.random.default_rng(seed_base)
    named = motion_ok = objects = exact = yes_no_ok = 0
    for start in range(0, count, batch):
        clips = [render_clip(seed_base + i, FRAMES, vlm.config.image_size) for i in range(start, min(start + batch, count))]
        features = [vlm.encode_frames(vlm.preprocess(c.frames)) for c in clips]
        outputs = vlm.generate([VideoQuery(CAPTION_PROMPTS[0], features=f) for f in features], max_new_tokens=48)
        for clip, feats, out in zip(clips, features, outputs):
            said = {(c, s): m for c, s, m in parse_caption(out.text)}
            truth = {o.kind: o.motion for o in clip.scene.objects}
            objects += len(truth)
            named += sum(kind in said for kind in truth)
            motion_ok += sum(said.get(kind) == motion for kind, motion in truth.items())
            exact += set(said) == set(truth)
            question, answer = pick_task_yes_no(clip.scene, rng)
            p_yes = vlm.yes_probability(VideoQuery(question, features=feats))
            yes_no_ok += (p_yes > 0.5) == (answer == "Yes")
    return Accuracy(count, objects, named / objects, motion_ok / objects, exact / count, yes_no_ok / count)


def pick_task_yes_no(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    while True:
        question, answer = pick_task(scene, rng)
        if answer in ("Yes", "No"):
            return question, answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.train_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the checkpoint")
    defaults = TrainSettings()
    for field in ("clips", "vision_steps", "language_steps", "seed", "workers"):
        parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field))
    parser.add_argument("--eval-clips", type=int, default=100, help="fresh clips to evaluate on afterwards (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = TrainSettings(clips=args.clips, vision_steps=args.vision_steps, language_steps=args.language_steps,
                             seed=args.seed, workers=args.workers)
    folder = train(args.folder, settings)
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info("checkpoint size %.2f MB", size / 1e6)
    if args.eval_clips:
        accuracy = evaluate(SlowFastVLM.from_pretrained(folder, device="cpu"), args.eval_clips)
        log.info("evaluation: %s", accuracy.summary())
        (folder / "evaluation.json").write_text(json.dumps(accuracy.__dict__, indent=2))


if __name__ == "__main__":
    main()
