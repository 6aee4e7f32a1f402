"""`SlowFastVLM`: the public face of model/ (load, preprocess, encode, generate)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from . import generation
from .checkpoint import expected_keys, iter_tensors, load_weights
from .checkpoint_folder import resolve_checkpoint
from .compiled import CompiledOrEager
from .decode_attention import DecodeAttentionChoice
from .config import SlowFastConfig
from .errors import ModelInputError
from .modeling import SlowFastForCausalLM
from .preprocess import preprocess_frames
from .prompt import CAPTION_PROMPT, END_OF_TURN, PromptIds, build_prompt
from .visual_tokens import VisualTokens, image_tokens, video_tokens

logger = logging.getLogger(__name__)

# Frames per vision-tower forward: bounds activation memory for long windows; 16 is one
# window stride of new frames in the pipeline.
DEFAULT_ENCODE_BATCH = 16


@dataclass
class VideoQuery:
    """A question about a clip, given as raw frames or as per-frame features from encode_frames.

    Queries of one `generate` call that hold the same frames or features object share one
    prefill of the prompt's head (system turn and video tokens): asking several questions about
    a clip costs one video prefill plus each question's own tokens."""

    question: str
    frames: np.ndarray | torch.Tensor | None = None
    features: torch.Tensor | None = None
    max_new_tokens: int | None = None  # None: the call's; 0: no answer text, only the first-token scores (P(yes))

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.features is None):
            raise ModelInputError("VideoQuery needs exactly one of frames= or features=")


@dataclass
class TextQuery:
    """A question without video (e.g. summarising captions): the official text-only path,
    no fast tokens in the sequence and no cross term in the hybrid layers."""

    question: str
    max_new_tokens: int | None = None  # None: the call's


Query = VideoQuery | TextQuery


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: generation.FinishReason
    yes_probability: float  # from the same forward's first-token scores, as `yes_probability` gives


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    # AutoTokenizer peeks at config.json and warns that it does not know our model_type;
    # the tokenizer itself is a plain Qwen2 one, so that warning is noise.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    finally:
        transformers_logging.set_verbosity(verbosity)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _build(config: SlowFastConfig, device: torch.device, dtype: torch.dtype, materialize: bool) -> SlowFastForCausalLM:
    """Construct on the meta device; with `materialize`, allocate randomly initialised weights on `device`."""
    with torch.device("meta"):
        network = SlowFastForCausalLM(config)
    if materialize:
        with torch.device(device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                network = SlowFastForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
    else:
        # Non-persistent buffers (rotary inv_freq) are not in checkpoints: rebuild them for real.
        network.model.rotary_emb = type(network.model.rotary_emb)(network.model.text_config).to(device)
    return network.eval()


class SlowFastVLM:
    def __init__(
        self,
        network: SlowFastForCausalLM,
        tokenizer: PreTrainedTokenizerBase | None,
        device: torch.device,
        dtype: torch.dtype,
        encode_batch_size: int = DEFAULT_ENCODE_BATCH,
        compile: bool | None = None,
        decode_attention: DecodeAttentionChoice = "auto",
    ):
        """`compile` (default: on CUDA) compiles the decode step into CUDA graphs and the
        vision tower; call `warm_up` before the first real call to pay for it up front.
        `decode_attention` picks the decode step's attention kernel (model.decode_attention)."""
        self.network = network
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.encode_batch_size = encode_batch_size
        compile = device.type == "cuda" if compile is None else compile
        cuda = device.type == "cuda"
        self.decoder = generation.Decoder(network, compile=compile, mode="reduce-overhead" if cuda else None,
                                          decode_attention=decode_attention)
        self.tower = network.model.vision_tower
        if cuda:  # ConvNeXt's norms and MLPs run on NHWC: no transposes with channels_last
            self.tower.to(memory_format=torch.channels_last)
        if compile and device.type != "meta":
            self.tower = CompiledOrEager(network.model.vision_tower, "vision tower")

    @property
    def config(self) -> SlowFastConfig:
        return self.network.config

    # ---- construction ------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        encode_batch_size: int = DEFAULT_ENCODE_BATCH,
        compile: bool | None = None,
        decode_attention: DecodeAttentionChoice = "auto",
    ) -> SlowFastVLM:
        folder = resolve_checkpoint(path_or_hub_id)
        config = SlowFastConfig.from_source(folder)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        network = _build(config, device, dtype, materialize=False)
        load_weights(
            network,
            iter_tensors(folder),
            device,
            dtype,
            tie_word_embeddings=config.tie_word_embeddings,
            source=f"checkpoint {folder}",
        )
        return cls(network, load_tokenizer(folder), device, dtype, encode_batch_size, compile, decode_attention)

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | dict[str, Any] | SlowFastConfig,
        device: str | torch.device = "meta",
        dtype: torch.dtype | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        compile: bool | None = None,
        decode_attention: DecodeAttentionChoice = "auto",
    ) -> SlowFastVLM:
        """Random initialisation; on "meta" nothing is allocated (shapes and names only)."""
        if not isinstance(config, SlowFastConfig):
            config = SlowFastConfig.from_source(config if isinstance(config, dict) else Path(config))
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        if device.type == "meta":
            with torch.device("meta"):
                network = SlowFastForCausalLM(config).eval()
        else:
            network = _build(config, device, dtype, materialize=True)
        return cls(network, tokenizer, device, dtype, compile=compile, decode_attention=decode_attention)

    def expected_checkpoint_keys(self) -> dict[str, tuple[int, ...]]:
        return expected_keys(self.network)

    # ---- vision -------------------------------------------------------------
    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [T, H, W, 3] RGB -> normalised float [T, 3, S, S] on the model's device."""
        return preprocess_frames(frames, self.config.image_size, self.device, self.dtype)

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ModelInputError(f"pixels must be a float tensor [T, 3, {size}, {size}] from preprocess(), got {shape}")
        if pixels.shape[0] == 0:
            raise ModelInputError("pixels hold no frames")
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-frame pooled slow features [T, tokens_per_frame, hidden] of video frames.

        Each frame's features depend on that frame alone, so they can be cached per frame
        and reused in every window that contains it.
        """
        return self.network.encode_video_frames(self._check_pixels(pixels), self.encode_batch_size, self.tower)

    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        expected = (self.config.tokens_per_frame, self.config.hidden_size)
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or tuple(features.shape[1:]) != expected:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ModelInputError(f"features must be [T, {expected[0]}, {expected[1]}] from encode_frames(), got {shape}")
        if features.shape[0] == 0:
            raise ModelInputError("features hold no frames")
        return features.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def visual_tokens(self, query: Query) -> VisualTokens:
        if isinstance(query, TextQuery):  # no visual input: empty fast and slow tokens
            empty = torch.zeros(0, self.config.hidden_size, device=self.device, dtype=self.dtype)
            return VisualTokens(fast=empty, slow=empty)
        if query.features is not None:
            return video_tokens(self._check_features(query.features), self.config)
        pixels = self.preprocess(query.frames)
        if pixels.shape[0] == 1:  # a single image: unpooled grid (official image path)
            return image_tokens(self.network.project_frames(pixels, self.encode_batch_size, self.tower), self.config)
        return video_tokens(self.encode_frames(pixels), self.config)

    # ---- language -------------------------------------------------------------
    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ModelInputError("this model has no tokenizer (built with from_config without tokenizer=)")
        return self.tokenizer

    @property
    def context_length(self) -> int:
        limit = self.config.max_position_embeddings
        if self.config.tokenizer_model_max_length:
            limit = min(limit, self.config.tokenizer_model_max_length)
        return limit

    def _batch(self, queries: list[Query], room_for_answer: int, share_prefixes: bool = True) -> generation.PromptBatch:
        """The prompts of `queries`. Video queries holding the same frames or features object
        share their head (unless `share_prefixes` is False: each prompt whole, the reference)."""
        if not queries:
            raise ModelInputError("no queries given")
        tokenizer = self._require_tokenizer()
        limit = self.context_length - room_for_answer
        prompts = [build_prompt(tokenizer, q.question, image=not isinstance(q, TextQuery)) for q in queries]
        # The video input's identity: the same object means the same clip (ids are stable while
        # `queries` holds them).
        clips = [id(q.features if q.features is not None else q.frames) if isinstance(q, VideoQuery) else None
                 for q in queries]
        shared = share_prefixes and any(clip is not None and clips.count(clip) > 1 for clip in clips)
        if not shared:
            samples = [generation.Sample(prompt, self.visual_tokens(q)) for q, prompt in zip(queries, prompts)]
            return generation.assemble(self.network, samples, limit)
        heads: list[generation.Sample] = []
        head_of: dict[int, int] = {}
        rows: list[tuple[int, list[int]]] = []
        for query, prompt, clip in zip(queries, prompts, clips):
            if clip is None:  # text only: its whole prompt is its own
                rows.append((-1, prompt.before_image))
                continue
            if clip not in head_of:
                head_of[clip] = len(heads)
                heads.append(generation.Sample(PromptIds(prompt.before_image, []), self.visual_tokens(query)))
            rows.append((head_of[clip], prompt.after_image))
        return generation.assemble_shared(self.network, heads, rows, limit)

    @property
    def stop_token_ids(self) -> list[int]:
        tokenizer = self._require_tokenizer()
        ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN), *self.config.stop_token_ids]
        return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))

    def generate(
        self,
        queries: list[Query],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        decode_cross_attention: bool = False,
        seed: int | None = None,
    ) -> list[Generation]:
        """Answer several (clip, question) pairs and text-only questions in one batched call;
        temperature 0 is greedy."""
        budgets = [max_new_tokens if q.max_new_tokens is None else q.max_new_tokens for q in queries]
        if any(budget < 0 for budget in budgets):
            raise ModelInputError(f"max_new_tokens must be >= 0, got {min(budgets)}")
        settings = generation.SamplingSettings(
            max_new_tokens, temperature, top_p, repetition_penalty, decode_cross_attention, seed
        )
        batch = self._batch(list(queries), room_for_answer=max(budgets, default=0))
        sequences = self.decoder.generate(batch, settings, self.stop_token_ids, budgets)
        probabilities = self._yes_probabilities(torch.stack([seq.first_logits for seq in sequences]))
        return [
            Generation(
                text=self.tokenizer.decode(seq.token_ids, skip_special_tokens=True).strip(),
                token_ids=seq.token_ids,
                finish_reason=seq.finish_reason,
                yes_probability=probability,
            )
            for seq, probability in zip(sequences, probabilities)
        ]

    def next_token_logits(self, query: Query) -> torch.Tensor:
        """Float32 logits [vocab] for the first answer token."""
        return generation.prefill_logits(self.network, self._batch([query], room_for_answer=1))[0].cpu()

    def answer_token_ids(self, word: str) -> list[int]:
        """First token of `word` with and without a leading space (the answer may start either way)."""
        tokenizer = self._require_tokenizer()
        firsts = (tokenizer(text, add_special_tokens=False)["input_ids"][:1] for text in (word, " " + word))
        return list(dict.fromkeys(ids[0] for ids in firsts if ids))

    def yes_probability(self, query: Query) -> float:
        """P(yes) / (P(yes) + P(no)) for the first answer token, for yes/no alerts."""
        (probability,) = self._yes_probabilities(self.next_token_logits(query)[None])
        return probability

    def _yes_probabilities(self, first_logits: torch.Tensor) -> list[float]:
        """P(yes) / (P(yes) + P(no)) per row of first-token logits [B, vocab]; 0.5 when neither
        word is likely at all."""
        probs = first_logits.float().softmax(-1)
        yes = probs[:, self.answer_token_ids("Yes")].sum(-1)
        no = probs[:, self.answer_token_ids("No")].sum(-1)
        total = yes + no
        return torch.where(total > 0, yes / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5).tolist()

    def warm_up(self, frames: int, max_new_tokens: int, row_counts: Iterable[int],
                decode_cross_attention: bool = False) -> float:
        """Compile and capture, before the first real call, what serving `frames`-frame
        windows will use: the tower at the encode batch size, and the decode step at the
        padded size of each of `row_counts` (the rows a generate call may hold), each size
        once. With a compile cache (`model.compiled.use_compile_cache`) filled by an earlier
        process, this loads instead of compiling. Returns seconds spent; nothing to do (0.0)
        on the eager path.
        """
        if not self.decoder.compiled and not isinstance(self.tower, CompiledOrEager):
            return 0.0
        started = time.perf_counter()
        size = self.config.image_size
        features = self.encode_frames(torch.zeros(self.encode_batch_size, 3, size, size))[:1].expand(frames, -1, -1)
        settings = generation.SamplingSettings(max_new_tokens, decode_cross_attention=decode_cross_attention)
        # The compiled decoder pads a batch's rows to a power of two: one graph per padded size.
        padded = sorted({generation._next_power_of_two(rows) for rows in row_counts}) if self.decoder.compiled else []
        for rows in padded:
            queries = [VideoQuery(question=CAPTION_PROMPT, features=features)] * rows
            self.decoder.generate(self._batch(queries, room_for_answer=max_new_tokens), settings, stop_token_ids=[])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        logger.info("warm-up (compile + CUDA graph capture) of decode rows %s took %.1f s", padded, seconds)
        return seconds
