"""Finding a checkpoint folder and checking it without reading its weights.

No torch here: the driver checks the checkpoint before it starts Ray, and only the model
workers import the model libraries (hundreds of MB and seconds per process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


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
