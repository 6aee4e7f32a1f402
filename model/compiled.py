"""torch.compile with a safety net: a compiler failure degrades to eager, it never fails a call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


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
