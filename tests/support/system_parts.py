"""Parts outside Python that some tests need (Chromium, gst-rtsp-server, hadolint).

On a developer's machine a test whose part is missing skips and says what installs it. On CI
(`CI=true`) `make install` has installed every part, so a missing one means that step broke:
the test fails instead of hiding behind a skip.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__: list[str] = []  # helpers only


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_part(part: str, install: str) -> NoReturn:
    """Skip (fail on CI) a test whose system part is missing; `install` says what installs it."""
    message = f"{part} is not installed ({install})"
    if on_ci():
        pytest.fail(f"{message}; on CI (CI=true) every system part must be there", pytrace=False)
    pytest.skip(message)
