"""The row counts one model call of the engine can hold: the shapes a worker warms up."""

from __future__ import annotations

from ..config import PipelineConfig


def batch_row_counts(config: PipelineConfig) -> range:
    """Every row count a generate call can have under `config`.

    A batch holds up to `batch_size` windows, each with its caption and every standing
    question due (a probability-only question holds a row too), and rolling summaries only
    in free window slots; ad-hoc questions and final summaries go `batch_size` at a time.
    Streams added at run time with more standing questions than any configured stream meet
    their larger shapes, and compile them, when they first run.
    """
    questions = max((len(stream.standing_questions) for stream in config.streams), default=0)
    return range(1, config.batch_size * (1 + questions) + 1)
