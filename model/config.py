"""Typed view of the official `config.json` (model_type `llava_qwen_slow_fast`).

Every field the spec names is a typed attribute; any other field of the file is kept
(pydantic `extra="allow"`) so a config round-trips unchanged. Values this
implementation cannot honour raise `UnsupportedConfigError` naming field and value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.validation import describe_validation_error

from . import check_installed_versions
from .errors import UnsupportedConfigError

if TYPE_CHECKING:  # the driver reads configs without transformers; text_config imports it
    from transformers import Qwen2Config

check_installed_versions()  # a clear message for a too-old torch or transformers, before they are used

SUPPORTED_VISION_TOWERS = ("convnext-576",)
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
# The "-flashattn" suffix only picked the official kernel; the maths is the same.
SUPPORTED_CROSS_ATTN = ("text-only-vanilla", "text-only-vanilla-flashattn")
SUPPORTED_GATING = ("whole-dynamic-tanh-warmup",)


class VisionConfig(BaseModel):
    """ConvNeXt sizes. Released checkpoints omit it: the defaults are ConvNeXt-XXLarge."""

    model_config = ConfigDict(extra="ignore")

    depths: list[int] = Field(default_factory=lambda: [3, 4, 30, 3])
    dims: list[int] = Field(default_factory=lambda: [384, 768, 1536, 3072])
    norm_eps: float = 1e-5
    image_size: int = 576
    # Stem patch and per-stage downsampling of ConvNeXt: the grid is image_size / 32.
    stem_stride: int = 4
    downsample_stride: int = 2

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"vision_config.depths {self.depths} and dims {self.dims} must have the same non-zero length")
        if self.image_size % self.total_stride:
            raise ValueError(f"vision_config.image_size {self.image_size} is not a multiple of the tower stride {self.total_stride}")
        return self

    @property
    def total_stride(self) -> int:
        return self.stem_stride * self.downsample_stride ** (len(self.dims) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.total_stride


class SlowFastConfig(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_type: str = "llava_qwen_slow_fast"
    architectures: list[str] = Field(default_factory=lambda: ["LlavaQwenSlowFastForCausalLM"])

    # Qwen2 language model
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tokenizer_model_max_length: int | None = None

    # vision tower and projector
    mm_vision_tower: str = "convnext-576"
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 3072
    mm_use_im_start_end: bool = False
    vision_config: VisionConfig = Field(default_factory=VisionConfig)

    # slow / fast tokens
    mm_video_pooling_stride: int = 2
    fast_token_spatial_stride: int = 1
    fast_token_temporal_stride: int = 1
    fast_token_temporal_sampling_stride: int = 1
    min_fast_frames: int | None = 1

    # hybrid decoder layers
    cross_attn_every_n_layers: int = 8
    cross_attn_min_layer_depth: int | None = 0
    cross_attn_max_layer_depth: int | None = None
    cross_attn_implementation: str = "text-only-vanilla-flashattn"
    cross_attn_gating_type: str = "whole-dynamic-tanh-warmup"

    def check_supported(self) -> SlowFastConfig:
        """Raise UnsupportedConfigError for values this implementation cannot honour."""
        unsupported = {
            "mm_vision_tower": (self.mm_vision_tower, SUPPORTED_VISION_TOWERS),
            "mm_projector_type": (self.mm_projector_type, SUPPORTED_PROJECTORS),
            "cross_attn_implementation": (self.cross_attn_implementation, SUPPORTED_CROSS_ATTN),
            "cross_attn_gating_type": (self.cross_attn_gating_type, SUPPORTED_GATING),
        }
        for field, (value, allowed) in unsupported.items():
            if value not in allowed:
                raise UnsupportedConfigError(f"config.json {field}={value!r} is not supported (supported: {', '.join(allowed)})")
        if self.mm_use_im_start_end:
            raise UnsupportedConfigError("config.json mm_use_im_start_end=True is not supported (released checkpoints use False)")
        if self.use_sliding_window:
            raise UnsupportedConfigError("config.json use_sliding_window=True is not supported (Qwen2-7B uses full attention)")
        if self.mm_hidden_size != self.vision_config.dims[-1]:
            raise UnsupportedConfigError(
                f"config.json mm_hidden_size={self.mm_hidden_size} differs from the tower's last width {self.vision_config.dims[-1]}"
            )
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"config.json hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads}, "
                f"num_key_value_heads={self.num_key_value_heads} do not divide evenly"
            )
        grid = self.vision_config.grid_size
        if grid % self.mm_video_pooling_stride:
            raise UnsupportedConfigError(
                f"config.json mm_video_pooling_stride={self.mm_video_pooling_stride} does not divide the {grid}x{grid} grid"
            )
        if self.pooled_grid_size % self.fast_token_spatial_stride:
            raise UnsupportedConfigError(
                f"config.json fast_token_spatial_stride={self.fast_token_spatial_stride} does not divide the pooled grid {self.pooled_grid_size}"
            )
        return self

    # ---- derived values -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def hybrid_layer_ids(self) -> list[int]:
        start = self.cross_attn_min_layer_depth or 0
        stop = self.cross_attn_max_layer_depth if self.cross_attn_max_layer_depth is not None else self.num_hidden_layers
        return list(range(start, min(stop, self.num_hidden_layers), self.cross_attn_every_n_layers))

    @property
    def min_fast(self) -> int:
        # The official code reads a missing/None min_fast_frames as 1.
        return self.min_fast_frames or 1

    @property
    def pooled_grid_size(self) -> int:
        return self.vision_config.grid_size // self.mm_video_pooling_stride

    @property
    def tokens_per_frame(self) -> int:
        """Slow tokens per video frame after per-frame pooling (81 for the released models)."""
        return self.pooled_grid_size**2

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def stop_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def text_config(self, attn_implementation: str = "sdpa") -> Qwen2Config:
        """The Qwen2Config that transformers' Qwen2 building blocks expect."""
        from transformers import Qwen2Config

        rope_parameters = dict(self.rope_scaling or {}) | {"rope_theta": self.rope_theta}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
        config = Qwen2Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope_parameters,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=self.attention_dropout,
            use_sliding_window=False,
        )
        config._attn_implementation = attn_implementation
        return config

    # ---- I/O --------------------------------------------------------------
    @classmethod
    def from_source(cls, source: str | Path | dict[str, Any]) -> SlowFastConfig:
        """Read a config.json path, a checkpoint folder or an already-parsed dict."""
        if isinstance(source, dict):
            data = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"config file not found: {path}")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise UnsupportedConfigError(f"{path} is not valid JSON: {exc}") from exc
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            reason = describe_validation_error(exc, show_input=True)
            raise UnsupportedConfigError(f"invalid config.json: {reason}") from exc
        return config.check_supported()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def isqrt_exact(n: int, what: str) -> int:
    """Side of a square token grid; the official code assumes square grids."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} tokens do not form a square grid")
    return side
