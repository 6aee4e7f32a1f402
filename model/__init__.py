"""The Slow-Fast video LLM (arXiv 2504.01328): our implementation, loading the released checkpoints.

Public API: `SlowFastVLM`, `VideoQuery`, `TextQuery`, `Generation`; see README "Model".
"""

import torch
import transformers
from packaging.version import Version

# The oldest versions the test suite passed with (pyproject.toml states the same bounds).
MIN_VERSIONS = {"torch": "2.8", "transformers": "5.0"}



def check_versions(found: dict[str, str]) -> None:
    """ImportError naming the package, the version found and the bound, for anything too old."""
    for package, version in found.items():
        if Version(Version(version).base_version) < Version(MIN_VERSIONS[package]):
            raise ImportError(
                f"slowfast-stream needs {package}>={MIN_VERSIONS[package]}, found {package} {version}: "
                f"pip install -U '{package}>={MIN_VERSIONS[package]}'"
            )


check_versions({"torch": torch.__version__, "transformers": transformers.__version__})

from .api import Generation, SlowFastVLM, TextQuery, VideoQuery
from .config import SlowFastConfig
from .errors import CheckpointError, ModelInputError, UnsupportedConfigError

__all__ = [
    "CheckpointError",
    "Generation",
    "ModelInputError",
    "SlowFastConfig",
    "SlowFastVLM",
    "TextQuery",
    "UnsupportedConfigError",
    "VideoQuery",
]
