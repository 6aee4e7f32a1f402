"""The random-weight Slow-Fast checkpoint (`model.random_checkpoint`), written once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import SlowFastVLM
from model.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("random-checkpoint"), seed=0)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_model_dir: Path) -> SlowFastVLM:
    return SlowFastVLM.from_pretrained(tiny_model_dir, device="cpu")


def random_frames(count: int, size: int = 576, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames [count, size, size, 3] with coarse structure (so pooling sees signal)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, size // 32, size // 32, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)
