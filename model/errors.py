"""Exceptions raised by model/: each names the offending value so callers can report it."""


class ModelInputError(ValueError):
    """Frames, features or a question that the model cannot take."""


class UnsupportedConfigError(ValueError):
    """A config.json value this implementation does not support (another tower, projector...)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or does not match the architecture."""
