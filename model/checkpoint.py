"""Loading a checkpoint folder's safetensors into a meta-built model.

The model is constructed on the meta device, then each tensor is read from the
memory-mapped safetensors file, cast and moved to the target device and assigned in
place of the meta parameter: a 7B model never exists twice in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint_folder import checkpoint_files
from .errors import CheckpointError
from .vision import UNUSED_KEY_PREFIXES

VISION_PREFIX = "model.vision_tower.vision_tower."


def is_unused_key(name: str) -> bool:
    """Keys the official files may carry that the network does not use."""
    if name.startswith(VISION_PREFIX):
        return name[len(VISION_PREFIX) :].startswith(UNUSED_KEY_PREFIXES)
    return name.endswith("rotary_emb.inv_freq")


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
