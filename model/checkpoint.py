"""Finding a checkpoint folder and loading its safetensors into a meta-built model.

The model is constructed on the meta device, then each tensor is read from the
memory-mapped safetensors file, cast and moved to the target device and assigned in
place of the meta parameter: a 7B model never exists twice in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import CheckpointError
from .vision import UNUSED_KEY_PREFIXES

VISION_PREFIX = "model.vision_tower.vision_tower."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def is_unused_key(name: str) -> bool:
    """Keys the official files may carry that the network does not use."""
    if name.startswith(VISION_PREFIX):
        return name[len(VISION_PREFIX) :].startswith(UNUSED_KEY_PREFIXES)
    return name.endswith("rotary_emb.inv_freq")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not os.path.isabs(name)


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded (or found in the HF cache) when reachable."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise CheckpointError(f"checkpoint folder {local} has no config.json")
        return local
    name = str(path_or_hub_id)
    if not _looks_like_hub_id(name):
        raise CheckpointError(f"checkpoint folder {local} does not exist (and {name!r} is not a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, auth: all end the same way for the caller
        raise CheckpointError(
            f"could not load checkpoint {name!r}: tried local folder {local.resolve()} (does not exist) "
            f"and hub id {name!r} ({type(exc).__name__}: {exc})"
        ) from exc


def check_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """Check a checkpoint without reading its weights, so a caller can fail fast: a local
    folder must hold a config.json this implementation supports and every weight file it
    lists; a hub id must be in the HF cache or reachable (only its config.json is fetched).
    Raises CheckpointError or UnsupportedConfigError naming what is wrong."""
    from .config import SlowFastConfig

    name = str(path_or_hub_id)
    if Path(name).expanduser().is_dir() or not _looks_like_hub_id(name):
        folder = resolve_checkpoint(name)
        checkpoint_files(folder)
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=name, allow_patterns=["config.json"]))
        except Exception as exc:  # offline and not cached, unknown repo, auth
            raise CheckpointError(
                f"checkpoint {name!r} is not a local folder, and as a hub id it is neither in the Hugging "
                f"Face cache nor reachable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from exc
    SlowFastConfig.from_source(folder)
    return folder


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / shard for shard in weight_map.values()})
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lists shards that are missing: {missing}")
    return files


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def expected_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{official parameter name: shape} that loading must provide."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def load_weights(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    tie_word_embeddings: bool = False,
    source: str = "checkpoint",
) -> None:
    """Assign checkpoint tensors to a (meta-built) model; list missing/unexpected keys on error."""
    expected = expected_keys(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    for name, tensor in tensors:
        if name not in expected:
            if not is_unused_key(name):
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {expected[name]}")
            continue
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        # A fresh allocation, not a view of the file buffer: owned memory, and aligned like
        # any other tensor so kernels take the same paths as for a model built in memory.
        owned = torch.empty(tensor.shape, dtype=target_dtype, device=device)
        _assign(model, name, owned.copy_(tensor))
        loaded.add(name)
    if tie_word_embeddings and "lm_head.weight" not in loaded and "model.embed_tokens.weight" in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        raise CheckpointError(f"{source} does not match the architecture: " + "; ".join(problems))
