"""The Ray-free engine a model worker runs: scheduler, model runner and output processor.

A window's way through it: `Engine.submit` queues it in the scheduler; `Engine.step` takes
the next batch, `ModelRunner.run_windows` encodes the frames its feature ring lacks and runs
every query due in one batched call, and `OutputProcessor.window_done` builds the records and
publishes them (one Redis transaction per window), writes the files and feeds the summaries.

Each name loads its module on first use: the model runner imports torch, which processes that
only hold a model worker's handle (ingest actors) or merge a split file's windows never need.
"""

from importlib import import_module

# Public name -> the module that defines it.
_PUBLIC = {
    "EarlierOutputs": "..resume",
    "Engine": ".engine",
    "FeatureRing": ".model_runner",
    "ModelRunner": ".model_runner",
    "OutputProcessor": ".output_processor",
    "Reply": "..messages",
    "StepResult": ".engine",
    "WindowReplies": "..messages",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
