"""torch.compile with a safety net: a compiler failure degrades to eager, it never fails a call."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def use_compile_cache(directory: str | os.PathLike) -> Path:
    """Keep this process's torch.compile artifacts under `directory` (created if missing):
    inductor's FX-graph and AOTAutograd caches and autotuning results, and the Triton
    kernels (in `triton/`). A later process that compiles the same functions at the same
    shapes with the same torch, compilers and device loads them instead of compiling.

    Call it before the process's first compile: compile workers read the location when they
    start. Raises OSError if the directory cannot be made or written, ValueError for a path
    with whitespace (inductor's C++ compile commands split it).
    """
    path = Path(directory).expanduser().absolute()
    if any(character.isspace() for character in str(path)):
        raise ValueError(f"{path} holds whitespace, which torch's compile commands cannot take")
    (path / "triton").mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{path} is not writable")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    return path


class CompiledOrEager:
    """Calls `torch.compile(function, fullgraph=True, dynamic=False, ...)`; if compiling or
    running the compiled version raises, logs one warning and calls `function` from then on.

    A retry after a failure is safe for the callers here: their functions only write
    buffers in place with values that depend on the inputs alone.
    """

    # Each batch/length bucket (and cross-attention on/off) is one compiled graph; past the
    # default limit of 8 per function torch would silently run the rest uncompiled.
    RECOMPILE_LIMIT = 64

    def __init__(self, function: Callable, what: str, mode: str | None = None, backend: str | Callable = "inductor"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.RECOMPILE_LIMIT)
        self.function = function
        self.what = what
        self.compiled: Callable | None = torch.compile(function, fullgraph=True, dynamic=False, mode=mode, backend=backend)
        self.cuda_graphs = mode is not None and "reduce-overhead" in mode

    @property
    def active(self) -> bool:
        """False once a failure switched to eager."""
        return self.compiled is not None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                if self.cuda_graphs:
                    # Outputs of the previous replay may be overwritten from here on.
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(*args)
            except Exception as exc:  # a compiler failure must not take the worker down
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                logger.warning("compiled %s failed, using eager from now on: %s: %s", self.what, type(exc).__name__, first_line)
                self.compiled = None
        return self.function(*args)
