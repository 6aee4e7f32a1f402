"""Test-only model wrappers that hold a worker's model calls on purpose.

`run_pipeline(config, worker_class=worker_with(HoldEachBatch(1.0)))`: each model worker wraps
the model it loads, so tests control timing instead of hoping the machine is fast or slow. The
wrappers live here, in the tests; the pipeline only lets a worker subclass load its model its
own way. They only wait: a model that fails is caused for real (a question longer than the
model's context, tests/test_pipeline_faults.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.actors import ModelWorker

__all__: list[str] = []  # helpers only (tests/conftest.py star-imports fixture modules)


class _Wrapped:
    """The model, with `generate` replaced; everything else is the model's own."""

    def __init__(self, model: Any, generate) -> None:
        self._model, self._generate = model, generate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, queries, **kwargs):
        return self._generate(self._model, queries, **kwargs)


@dataclass(frozen=True)
class HoldEachBatch:
    """Every batched generate call takes at least `seconds` longer: the worker is slower than
    any window rate the test sets, whatever the machine's load."""

    seconds: float

    def __call__(self, model: Any) -> _Wrapped:
        def generate(inner, queries, **kwargs):
            time.sleep(self.seconds)
            return inner.generate(queries, **kwargs)

        return _Wrapped(model, generate)


@dataclass(frozen=True)
class HoldWhileFileExists:
    """Every generate call waits while `gate` exists (the worker has fetched and encoded the
    batch's frames by then): the test decides when the held batch may go on."""

    gate: Path

    def __call__(self, model: Any) -> _Wrapped:
        def generate(inner, queries, **kwargs):
            while self.gate.exists():
                time.sleep(0.05)
            return inner.generate(queries, **kwargs)

        return _Wrapped(model, generate)


class CountingModel:
    """The tiny model, counting its generate calls and what each held."""

    def __init__(self, vlm):
        self.vlm, self.calls = vlm, []

    def __getattr__(self, name):
        return getattr(self.vlm, name)

    def generate(self, queries, **kwargs):
        self.calls.append([type(q).__name__ for q in queries])
        return self.vlm.generate(queries, **kwargs)


def worker_with(wrap) -> type[ModelWorker]:
    """A model worker class whose model is `wrap(the model it loads)`."""

    class WrappedModelWorker(ModelWorker):
        @staticmethod
        def load_model(config, model_path):
            return wrap(ModelWorker.load_model(config, model_path))

    return WrappedModelWorker

