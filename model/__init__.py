"""The Slow-Fast video LLM (arXiv 2504.01328): our implementation, loading the released checkpoints.

Public API: `SlowFastVLM`, `VideoQuery`, `Generation`; see README "Model".
"""

from .api import Generation, SlowFastVLM, VideoQuery
from .config import SlowFastConfig
from .errors import CheckpointError, ModelInputError, UnsupportedConfigError

__all__ = [
    "CheckpointError",
    "Generation",
    "ModelInputError",
    "SlowFastConfig",
    "SlowFastVLM",
    "UnsupportedConfigError",
    "VideoQuery",
]
