"""The Ray-free engine a model worker runs: scheduler, model runner and output processor.

A window's way through it: `Engine.submit` queues it in the scheduler; `Engine.step` takes
the next batch, `ModelRunner.run_windows` encodes the frames its feature ring lacks and runs
every query due in one batched call, and `OutputProcessor.window_done` builds the records and
publishes them (one Redis transaction per window), writes the files and feeds the summaries.
"""

from .engine import EarlierOutputs, Engine, StepResult
from .model_runner import FeatureRing, ModelRunner, Reply, WindowReplies
from .output_processor import OutputProcessor

__all__ = ["EarlierOutputs", "Engine", "FeatureRing", "ModelRunner", "OutputProcessor", "Reply", "StepResult",
           "WindowReplies"]
