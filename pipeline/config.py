"""The pipeline's one configuration: YAML file < SLOWFAST_* environment < CLI flags.

Validation errors name the field and the bad value (`ConfigError`).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from common.validation import describe_validation_error
from connectors.redis_schema import MAX_QUESTION_CHARS, check_stream_id
from connectors.sources import SourceError
from connectors.sources.uri import parse_source
from model.prompt import CAPTION_PROMPT

from .gate import DEFAULT_THRESHOLD

DEFAULT_CAPTION_PROMPT = CAPTION_PROMPT
ENV_PREFIX = "SLOWFAST_"


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names field and value."""


class Trigger(BaseModel):
    """When a standing question's answer raises an event."""

    model_config = ConfigDict(extra="forbid")

    starts_with: str | None = Field(default=None, description="answer text starts with this (case-insensitive)")
    p_yes_above: float | None = Field(default=None, ge=0.0, le=1.0, description="P(yes) above this threshold")
    open_after: int = Field(default=1, ge=1, le=1000, description="an event opens after this many windows in a row fire")
    close_after: int = Field(
        default=2, ge=1, le=1000, description="an open event closes after this many windows in a row do not fire "
        "(2: one window's flicker does not split an event)",
    )
    cooldown_windows: int = Field(default=0, ge=0, description="after a close, windows that open nothing")

    @model_validator(mode="after")
    def _one_rule(self) -> Trigger:
        if (self.starts_with is None) == (self.p_yes_above is None):
            raise ValueError("a trigger needs exactly one of starts_with or p_yes_above")
        return self

    def describe(self) -> str:
        return f"starts_with:{self.starts_with}" if self.starts_with is not None else f"p_yes>{self.p_yes_above}"


MAX_NOTIFY_TIMEOUT_S = 60.0


def _check_webhook(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"a webhook is an http:// or https:// URL with a host, not {url!r}")
    return url


class NotifySink(BaseModel):
    """Where an event's openings and closings are delivered (pipeline/notify.py)."""

    model_config = ConfigDict(extra="forbid")

    webhook: Annotated[str, AfterValidator(_check_webhook)] = Field(description="URL the event JSON is POSTed to")
    secret: SecretStr | None = Field(
        default=None, description="signs each body: header X-Slowfast-Signature: sha256=<HMAC-SHA256 hex>")
    timeout_s: float = Field(default=5.0, gt=0.0, le=MAX_NOTIFY_TIMEOUT_S, description="per attempt")
    max_attempts: int = Field(default=6, ge=1, le=100, description="tries before the delivery is written down as failed")


class StandingQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Named by the stream-id rule: nothing about a question's id needs another.
    id: Annotated[str, AfterValidator(partial(check_stream_id, what="standing question id"))]
    prompt: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    every_n_windows: int = Field(default=1, ge=1)
    trigger: Trigger | None = None
    answer: Literal["text", "probability"] = Field(
        default="text", description="text: the model's answer, decoded; probability: P(yes) from the first "
        "token alone, no decoding (the answer reads Yes or No), for yes/no questions that only raise events",
    )
    notify: list[NotifySink] = Field(default_factory=list, description="sinks of this question's events, "
                                     "besides the stream's")


class GateConfig(BaseModel):
    """The scene gate: windows whose new frames barely differ from the last window the model
    saw are published unchanged, without the model (see pipeline/gate.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(default=None, description="None: on for live sources, off for files")
    threshold: float = Field(default=DEFAULT_THRESHOLD, gt=0.0, le=1.0,
                             description="fraction of a frame's 32x32 copy that must change")
    refresh_every_n_windows: int = Field(default=10, ge=1, description="a static scene is captioned every N windows")


class StreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    source: str = Field(min_length=1)
    live: bool | None = Field(default=None, description="None: decided by the source (cameras live, files not)")
    caption_prompt: str = Field(default=DEFAULT_CAPTION_PROMPT, min_length=1, max_length=MAX_QUESTION_CHARS)
    caption_every_n_windows: int = Field(default=1, ge=1)
    summary_every_n_windows: int | None = Field(
        default=None, ge=0, le=1000,
        description="a rolling summary of the captions every N windows; None: the windows of about one minute; 0: none",
    )
    standing_questions: list[StandingQuestion] = Field(default_factory=list)
    gate: GateConfig = Field(default_factory=GateConfig)
    notify: list[NotifySink] = Field(default_factory=list, description="sinks of every event of the stream")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_stream_id(value)

    def is_live(self) -> bool:
        """`live` if set, else what the source's kind says (SourceError if it can never work)."""
        return self.live if self.live is not None else parse_source(self.source).presumed_live

    def is_file(self) -> bool:
        """A stream known to end (a file), for progress bars: an unusable source is not one."""
        try:
            return not self.is_live()
        except SourceError:
            return False


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    decode_cross_attention: bool = False
    decode_attention: Literal["auto", "sdpa", "flex", "flash"] = Field(
        default="auto", description="the decode step's attention kernel; auto: flash-attn's when installed on "
        "CUDA (float16/bfloat16), else FlexAttention when compiled on CUDA, else SDPA (docs/model.md)",
    )


class PipelineConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    redis_url: str | None = Field(default=None, description="None: start an embedded Redis")
    ray_address: str | None = Field(default=None, description="None: a local Ray; 'auto' or host:port for a cluster")
    ray_namespace: str = "slowfast"
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus port of the local Ray this run starts (0: any "
        "free port); on a cluster (ray_address set) each node's `ray start --metrics-export-port`",
    )
    model: str | None = Field(default=None, description="checkpoint folder or hub id; None: the small synthetic-world model shipped with the package")
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    window: int = Field(default=64, ge=2, le=1024)
    stride: int = Field(default=16, ge=1)
    fps: float = Field(default=4.0, gt=0.0, le=120.0)
    size: int | None = Field(default=None, ge=32, description="frame size; None: the model's input size")
    batch_size: int = Field(default=8, ge=1, le=256)
    encode_batch_size: int = Field(default=16, ge=1, le=256, description="frames per vision-tower forward")
    compile_cache_dir: Path | None = Field(
        default=None, description="model workers keep torch.compile's artifacts here, so a restarted worker "
        "loads its compiled shapes instead of compiling them again; None: torch's default, a temporary directory",
    )
    file_windows_in_flight: int = Field(default=2, ge=1, description="file backpressure: windows queued per stream")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    streams: list[StreamConfig] = Field(default_factory=list)
    history_len: int = Field(default=10_000, ge=10)
    out_dir: Path = Path("out")
    workers: int | None = Field(default=None, ge=1, description="model workers; None: one per GPU, or 1 on CPU")
    worker_cpus: float = Field(
        default=1.0, gt=0.0, description="Ray CPUs a model worker reserves when the cluster has no GPU",
    )
    split_min_s: float = Field(
        default=20.0, gt=0.0, description="with more than one model worker, a file is split by time over them in "
        "segments of at least this many seconds of video (and at least 8 pre-rolls of window - stride frames); "
        "a file too short for two stays whole",
    )
    worker_failover_s: float = Field(
        default=30.0, gt=0.0, description="a model worker unreachable this long (e.g. its node died and no GPU is "
        "free for its restart) hands its streams to the other workers; one that died for good does at once",
    )
    ingest_cpus: float = Field(
        default=0.25, gt=0.0, description="Ray CPUs each ingest actor reserves (scheduling only; a 4 fps "
        "stream decodes in a fraction of a core): streams per node = free CPUs / ingest_cpus",
    )
    ingest_node_resource: str | None = Field(
        default=None, description="prefer nodes that have this Ray resource for ingest actors (soft: "
        "if none is alive they run elsewhere)",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="extra Ray resources each model worker requires (hard)"
    )

    @field_validator("stride")
    @classmethod
    def _stride_fits(cls, value: int, info) -> int:
        window = info.data.get("window")
        if window is not None and value > window:
            raise ValueError(f"stride {value} is larger than the window {window}")
        return value

    @model_validator(mode="after")
    def _unique_streams(self) -> PipelineConfig:
        ids = [s.id for s in self.streams]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"stream ids must be unique, repeated: {duplicates}")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # CLI flags arrive as init kwargs: they override the environment, which overrides the YAML
        # file that model_config names (none here: load_config names it in a subclass).
        return init_settings, env_settings, YamlFile(settings_cls)


class YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, saying in one line why a file cannot be used."""

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file_path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping, got {type(data).__name__}")
        return data


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> PipelineConfig:
    """Build the config from an optional YAML file, SLOWFAST_* variables and explicit overrides."""
    settings_cls = PipelineConfig
    if path is not None:
        path = Path(path)
        try:  # pydantic-settings passes over a missing file; a file asked for must be there
            path.open("rb").close()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        settings_cls = type(PipelineConfig.__name__, (PipelineConfig,), {
            "__module__": __name__, "model_config": SettingsConfigDict(yaml_file=path)})
    try:
        config = settings_cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc, show_input=True)}") from exc
    # Always the plain class (one made for a file cannot be pickled to Ray's actors), same values.
    return config if type(config) is PipelineConfig else PipelineConfig.model_construct(
        config.model_fields_set, **dict(config))
