"""Shared fixtures: each area keeps its fixtures in tests/support/ and they are imported here."""
from tests.support.tiny_model import *  # noqa: E402,F401,F403
