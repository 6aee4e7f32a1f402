"""Shared fixtures: each area keeps its fixtures in tests/support/ and they are imported here."""
from tests.support.random_model import *  # noqa: E402,F401,F403
from tests.support.media import *  # noqa: E402,F401,F403
from tests.support.redis_server import *  # noqa: F401,F403
from tests.support.ray_cluster import *  # noqa: E402,F401,F403
from tests.support.web import *  # noqa: E402,F401,F403
