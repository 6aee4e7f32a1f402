"""Train the small synthetic-world Slow-Fast model: `python -m world.train OUT`.

Deterministic (fixed seeds, fixed thread count) and sized for 2 CPU cores. It renders its
own clips (`world.scenes`), then trains the same network, config format and
loading path as a released checkpoint, at small sizes, in two stages:

1. Vision: the ConvNeXt tower and projector learn from single frames through a
   temporary linear probe on the frame's pooled token: for each object kind, whether the
   frame shows it and where.
2. Language: with the tower frozen, its per-frame outputs are computed once and cached;
   the projector and the LLM then learn the captions and yes/no answers with the
   official prompt, token layout and cross-attention rule (prompt text only), through
   the same reference forward that checks cached decoding. Temporary linear probes
   (`SceneProbe`) on the frame tokens and the last prompt token teach the early layers to
   compare positions across frames; one at the end of each object's name in a caption
   teaches the LLM which travel belongs to which object.

No probe is part of the checkpoint.

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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import generation
from model.api import SlowFastVLM, VideoQuery, load_tokenizer
from model.config import SlowFastConfig
from model.language import FAST_VISUAL
from model.modeling import SlowFastForCausalLM
from model.preprocess import preprocess_frames
from model.prompt import CAPTION_PROMPT, END_OF_TURN, build_prompt
from model.random_checkpoint import RANDOM_CHECKPOINT_CONFIG, config_with_tokens, write_checkpoint, write_tokenizer
from model.visual_tokens import pool_frames, video_tokens

from .scenes import (
    COLOURS,
    KINDS,
    MARKER,
    SHAPES,
    MOTIONS,
    RenderedClip,
    Scene,
    WorldObject,
    parse_caption,
    render_clip,
    mirrored_scene,
    reversed_scene,
    yes_no_question,
)

log = logging.getLogger("world.train")

# Prompts the model captions for; the first is the model's caption prompt, the pipeline's default.
CAPTION_PROMPTS = (
    CAPTION_PROMPT,
    "Describe this video.",
    "What happens in this video?",
    "Describe the clip.",
)
FRAMES = 16  # one 4 s window at 4 fps
EVAL_SEED_BASE = 1_000_000  # evaluation clips use seeds from here; training uses 0..clips-1
VALIDATION_SEED_BASE = 2_000_000  # clips checked during training to stop early
MIN_COVERAGE = 0.2  # a pooled token is taught an object when it covers this much of the object's box

WORLD_CONFIG: dict[str, Any] = RANDOM_CHECKPOINT_CONFIG | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tokenizer_model_max_length": 2048,
    "mm_hidden_size": 48,
    "vision_config": {"depths": [1, 1, 1, 1], "dims": [12, 24, 32, 48], "norm_eps": 1e-5, "image_size": 64},
    "slowfast_stream_model": MARKER,
}


@dataclass(frozen=True)
class TrainSettings:
    clips: int = 3000
    vision_steps: int = 3000
    vision_batch: int = 64
    language_steps: int = 3000
    language_batch: int = 48
    check_every: int = 500  # language steps between checks on validation clips
    check_clips: int = 40
    seed: int = 0
    workers: int = 2
    probe_layer: int = 1  # decoder layer whose output the scene probe reads at the last prompt token
    object_probe_layer: int = 2  # decoder layer whose output the object probe reads after each object's name
    position_weight: float = 4.0  # of the frame probe's position error against its presence error


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
        return list(pool.map(_render, seeds, chunksize=16))


def frame_targets(scenes: list[Scene], progress: torch.Tensor, flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the 15 kinds each frame shows [B, 15], and where their centres are [B, 15, 2]."""
    shown = torch.zeros(len(scenes), len(KINDS))
    where = torch.zeros(len(scenes), len(KINDS), 2)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            x, y = obj.centre(float(progress[b]))
            k = KINDS.index(obj.kind)
            shown[b, k] = 1
            where[b, k] = torch.tensor([1 - x if flipped[b] else x, y])
    return shown, where


class FrameProbe(nn.Module):
    """Temporary per-frame head on the mean pooled token (not part of the checkpoint): for each
    of the 15 kinds, whether the frame shows it and, if so, where (presence times x and y).
    A squared error on these linear targets makes the tower learn object kind and position
    from single frames within a few hundred steps (a sigmoid presence loss sits on its prior
    far longer). The position error is weighted up: with equal weights the tower's positions
    come out shrunk towards the middle, and motion read from them is wrong far more often."""

    def __init__(self, width: int, position_weight: float):
        super().__init__()
        self.head = nn.Linear(width, 3 * len(KINDS))
        self.position_weight = position_weight

    def loss(self, pooled: torch.Tensor, shown: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(pooled.mean(1))
        presence, position = out[:, : len(KINDS)], out[:, len(KINDS) :].unflatten(1, (len(KINDS), 2))
        presence_error = ((presence - shown) ** 2).sum(1).mean()
        position_error = ((position - shown[..., None] * where) ** 2).sum((1, 2)).mean()
        frames_right = ((presence > 0.5).float() == shown).all(1).float().mean()
        return presence_error + self.position_weight * position_error, frames_right


def train_vision(network: SlowFastForCausalLM, clips: list[RenderedClip], settings: TrainSettings,
                 generator: torch.Generator) -> None:
    config = network.config
    probe = FrameProbe(config.hidden_size, settings.position_weight)
    params = [*network.model.vision_tower.parameters(), *network.model.mm_projector.parameters(), *probe.parameters()]
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
        shown, where = frame_targets([clips[c].scene for c in clip_ids.tolist()], frame_ids / (FRAMES - 1), flipped)
        pooled = network.encode_video_frames(pixels, settings.vision_batch)
        loss, frames_right = probe.loss(pooled, shown, where)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.vision_steps - 1:
            log.info("vision step %d/%d: loss %.3f, frames with every kind right %.0f%% (%.0f s)",
                     step + 1, settings.vision_steps, loss.item(), 100 * frames_right.item(), time.monotonic() - started)


@torch.no_grad()
def tower_outputs(network: SlowFastForCausalLM, clips: list[RenderedClip]) -> torch.Tensor:
    """Frozen tower outputs of every frame, as shot and mirrored: [clips, 2, frames, grid^2, mm_hidden]."""
    size = network.config.image_size
    out = []
    for clip in clips:
        pixels = preprocess_frames(clip.frames, size)
        out.append(torch.stack([network.model.vision_tower(p) for p in (pixels, pixels.flip(-1))]).half())
    return torch.stack(out)


class Texts:
    """Token ids of prompts and answers, computed once per distinct string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self._prompts: dict[str, Any] = {}
        self._answers: dict[str, list[int]] = {}
        self._name_ends: dict[str, list[int]] = {}

    def prompt(self, question: str):
        if question not in self._prompts:
            self._prompts[question] = build_prompt(self.tokenizer, question)
        return self._prompts[question]

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end]
        return self._answers[text]

    def name_ends(self, scene: Scene) -> list[int]:
        """Index among the caption's tokens of the last token of each object's name ("a red
        circle"): the position whose next token is that object's verb. Words are tokenized
        apart, so a prefix of the caption tokenizes as a prefix of its tokens."""
        if scene.caption not in self._name_ends:
            ends = []
            for i, obj in enumerate(scene.objects):
                said = "".join(o.phrase + " and " for o in scene.objects[:i]) + f"a {obj.colour} {obj.shape}"
                ends.append(len(self.tokenizer(said, add_special_tokens=False)["input_ids"]) - 1)
            self._name_ends[scene.caption] = ends
        return self._name_ends[scene.caption]


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


def scene_targets(groups: list[Sequence[WorldObject]]) -> torch.Tensor:
    """For each of the 15 kinds: shown in the group, and its travel over the clip (2 dx, 2 dy): [B, 45]."""
    out = torch.zeros(len(groups), 3, len(KINDS))
    for b, objects in enumerate(groups):
        for obj in objects:
            k = KINDS.index(obj.kind)
            out[b, :, k] = torch.tensor([1.0, 2 * (obj.end[0] - obj.start[0]), 2 * (obj.end[1] - obj.start[1])])
    return out.flatten(1)


class SceneProbe(nn.Module):
    """Temporary head (not part of the checkpoint) on one decoder layer's output: which kinds
    the clip shows and how far each travels. Motion means comparing an object's position
    across frames, which the caption loss alone teaches only after thousands of steps. Read
    at every frame token but the first (motion is linear, so each frame token can tell it
    from the frame before it: a previous-token head) and at the last prompt token (where the
    answer starts), these linear targets teach it in fewer steps. Read after each object's
    name in a caption with that object's targets alone, they teach the verb's binding: which
    travel belongs to the object just named (without it, two-object clips often get the
    other object's verb)."""

    def __init__(self, network: SlowFastForCausalLM, layer: int):
        super().__init__()
        self.head = nn.Linear(network.config.hidden_size, 3 * len(KINDS))
        self.hidden: torch.Tensor | None = None
        self.hook = network.model.layers[layer].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Squared error of the head on rows [B, n, hidden] of the kept output against [B, 45] targets."""
        return ((self.head(rows) - targets[:, None]) ** 2).sum(-1).mean()


def train_language(network: SlowFastForCausalLM, texts: Texts, clips: list[RenderedClip], features: torch.Tensor,
                   settings: TrainSettings, generator: torch.Generator, rng: np.random.Generator,
                   check: Callable[[int], bool]) -> None:
    """Projector and LLM on the cached tower outputs (clips as shot or mirrored, played
    forwards or backwards); `check(step)` every `check_every` steps, stopping when it is true."""
    config = network.config
    for param in network.model.vision_tower.parameters():
        param.requires_grad_(False)
    probes = SceneProbe(network, 0), SceneProbe(network, settings.probe_layer), SceneProbe(network, settings.object_probe_layer)
    frame_probe, summary_probe, object_probe = probes
    params = [p for p in network.parameters() if p.requires_grad]
    params += [p for probe in probes for p in probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    schedule = _cosine(optimizer, settings.language_steps, warmup=100)
    # The reference uncached forward (prompt + answer in one pass), without its inference_mode.
    forward = inspect.unwrap(generation.logits_without_cache)
    pad = texts.tokenizer.pad_token_id
    started = time.monotonic()
    for step in range(settings.language_steps):
        ids = torch.randint(len(clips), (settings.language_batch,), generator=generator).tolist()
        mirrored = (torch.rand(settings.language_batch, generator=generator) < 0.5).tolist()
        backwards = (torch.rand(settings.language_batch, generator=generator) < 0.5).tolist()
        grid_tokens = features[ids, torch.tensor(mirrored, dtype=torch.long)].float()  # [B, T, grid^2, C]
        grid_tokens = torch.stack([g.flip(0) if back else g for g, back in zip(grid_tokens, backwards)])
        batch, frames = grid_tokens.shape[:2]
        projected = network.model.mm_projector(grid_tokens.flatten(0, 1))
        pooled = pool_frames(projected, config.mm_video_pooling_stride).unflatten(0, (batch, frames))
        samples, answers, scenes, captioned = [], [], [], []
        for b, clip_id in enumerate(ids):
            scene = clips[clip_id].scene
            scene = mirrored_scene(scene) if mirrored[b] else scene
            scene = reversed_scene(scene) if backwards[b] else scene
            scenes.append(scene)
            question, answer = pick_task(scene, rng)
            samples.append(generation.Sample(texts.prompt(question), video_tokens(pooled[b], config)))
            answers.append(texts.answer(answer))
            captioned.append(answer == scene.caption)
        prompt_batch = generation.assemble(network, samples, context_limit=config.max_position_embeddings)
        longest = max(len(a) for a in answers)
        targets = torch.tensor([a + [pad] * (longest - len(a)) for a in answers])
        logits = forward(network, prompt_batch, targets, decode_cross_attention=False)[:, :longest]
        mask = torch.tensor([[1.0] * len(a) + [0.0] * (longest - len(a)) for a in answers])
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(mask)
        caption_loss = (losses * mask).sum() / mask.sum()
        prompt_length = prompt_batch.valid.shape[1]  # prompts are left-padded: all end here
        visual = prompt_batch.token_types == FAST_VISUAL  # as many in every row
        frame_rows = frame_probe.hidden[:, :prompt_length][visual].unflatten(0, (batch, -1))[:, 1:]
        summary_rows = summary_probe.hidden[:, prompt_length - 1 : prompt_length]
        truth = scene_targets([scene.objects for scene in scenes])
        probe_loss = frame_probe.loss(frame_rows, truth) + summary_probe.loss(summary_rows, truth)
        # After each object's name in a caption, the facts of that object alone.
        named = [(b, end, obj) for b, scene in enumerate(scenes) if captioned[b]
                 for obj, end in zip(scene.objects, texts.name_ends(scene))]
        if named:
            rows = torch.stack([object_probe.hidden[b, prompt_length + end] for b, end, _ in named])[:, None]
            probe_loss = probe_loss + object_probe.loss(rows, scene_targets([(obj,) for _, _, obj in named]))
        loss = caption_loss + probe_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == settings.language_steps - 1:
            log.info("language step %d/%d: caption loss %.4f, scene probe loss %.3f (%.0f s)", step + 1,
                     settings.language_steps, caption_loss.item(), probe_loss.item(), time.monotonic() - started)
        if (step + 1) % settings.check_every == 0 and check(step + 1):
            log.info("stopping after %d language steps: the validation clips pass", step + 1)
            break
    for probe in probes:
        probe.hook.remove()


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
    validation = render_clips(range(VALIDATION_SEED_BASE, VALIDATION_SEED_BASE + settings.check_clips), settings.workers)
    log.info("rendered %d + %d clips in %.0f s", len(clips), len(validation), time.monotonic() - started)
    train_vision(network, clips, settings, generator)
    features = tower_outputs(network, clips)
    log.info("cached tower outputs %s (%.0f s so far)", tuple(features.shape), time.monotonic() - started)
    tokenizer = load_tokenizer(folder)
    vlm = SlowFastVLM(network, tokenizer, torch.device("cpu"), torch.float32, compile=False)

    def check(step: int) -> bool:
        network.eval()
        accuracy = evaluate_clips(vlm, validation)
        network.train()
        log.info("validation after %d steps: %s (%.0f s so far)", step, accuracy.summary(), time.monotonic() - started)
        return accuracy.passes(margin=0.04)

    train_language(network, Texts(tokenizer), clips, features, settings, generator, rng, check)
    network.eval()
    write_checkpoint(folder, network, config_dict, token_ids, shards=1)
    log.info("trained in %.0f s; checkpoint %s", time.monotonic() - started, folder)
    return folder


# ---- evaluation -----------------------------------------------------------------

BAR = {"kind": 0.90, "motion": 0.80, "yes_no": 0.90}  # the shipped model's accuracy bar on fresh clips


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

    def passes(self, margin: float = 0.0) -> bool:
        return all(getattr(self, name) >= bar + margin for name, bar in BAR.items())


def evaluate(vlm: SlowFastVLM, count: int = 100, seed_base: int = EVAL_SEED_BASE, batch: int = 16) -> Accuracy:
    """Accuracy on `count` fresh clips (seeds from `seed_base`, disjoint from training's)."""
    clips = [render_clip(seed_base + i, FRAMES, vlm.config.image_size) for i in range(count)]
    return evaluate_clips(vlm, clips, np.random.default_rng(seed_base), batch)


@torch.no_grad()
def evaluate_clips(vlm: SlowFastVLM, clips: list[RenderedClip], rng: np.random.Generator | None = None,
                   batch: int = 16) -> Accuracy:
    rng = rng or np.random.default_rng(0)
    named = motion_ok = objects = exact = yes_no_ok = 0
    for start in range(0, len(clips), batch):
        chunk = clips[start : start + batch]
        features = [vlm.encode_frames(vlm.preprocess(c.frames)) for c in chunk]
        outputs = vlm.generate([VideoQuery(CAPTION_PROMPTS[0], features=f) for f in features], max_new_tokens=48)
        for clip, feats, out in zip(chunk, features, outputs):
            said = {(c, s): m for c, s, m in parse_caption(out.text)}
            truth = {o.kind: o.motion for o in clip.scene.objects}
            objects += len(truth)
            named += sum(kind in said for kind in truth)
            motion_ok += sum(said.get(kind) == motion for kind, motion in truth.items())
            exact += set(said) == set(truth)
            question, answer = pick_task_yes_no(clip.scene, rng)
            p_yes = vlm.yes_probability(VideoQuery(question, features=feats))
            yes_no_ok += (p_yes > 0.5) == (answer == "Yes")
    return Accuracy(len(clips), objects, named / objects, motion_ok / objects, exact / len(clips), yes_no_ok / len(clips))


def pick_task_yes_no(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    while True:
        question, answer = pick_task(scene, rng)
        if answer in ("Yes", "No"):
            return question, answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m world.train", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the checkpoint")
    defaults = TrainSettings()
    fields = {name: int for name in ("clips", "vision_steps", "language_steps", "check_every", "check_clips", "seed", "workers")}
    fields["position_weight"] = float
    for name, kind in fields.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name))
    parser.add_argument("--eval-clips", type=int, default=100, help="fresh clips to evaluate on afterwards (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = TrainSettings(**{name: getattr(args, name) for name in fields})
    folder = train(args.folder, settings)
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info("checkpoint size %.2f MB", size / 1e6)
    if args.eval_clips:
        accuracy = evaluate(SlowFastVLM.from_pretrained(folder, device="cpu"), args.eval_clips)
        log.info("evaluation: %s", accuracy.summary())
        (folder / "evaluation.json").write_text(json.dumps(accuracy.__dict__, indent=2))


if __name__ == "__main__":
    main()
