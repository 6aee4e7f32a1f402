"""Shared fixtures: each area keeps its fixtures in tests/support/ and they are imported here."""
import os

# Before torch loads (the fixtures import it), for this process and every process it starts (Ray's
# workers, `slowfast run`): pytest-xdist's workers and their Ray workers share the machine's cores,
# and a torch thread pool per process (as many threads as cores, each spinning a while after every
# parallel region) oversubscribes them. One thread each; set OMP_NUM_THREADS to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from tests.support.random_model import *  # noqa: E402,F401,F403
from tests.support.media import *  # noqa: E402,F401,F403
from tests.support.redis_server import *  # noqa: F401,F403
from tests.support.ray_cluster import *  # noqa: E402,F401,F403
from tests.support.web import *  # noqa: E402,F401,F403


def pytest_collection_modifyitems(config, items):
    """Under xdist (`make test` runs 3 workers), hand out the longest work first, so no worker
    starts a four-minute test at the end: items sort by the seconds of their xdist group (a
    file whose module fixtures are costly keeps its tests on one worker) or their own, as
    `slow(seconds=...)` states them. A plain run keeps the files' order."""
    if not hasattr(config, "workerinput"):
        return

    def seconds(item) -> float:
        slow = item.get_closest_marker("slow")
        return slow.kwargs.get("seconds", 60) if slow else 1

    def group(item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return (mark.args[0] if mark.args else mark.kwargs["name"]) if mark else item.nodeid

    weight: dict[str, float] = {}
    for item in items:
        weight[group(item)] = weight.get(group(item), 0) + seconds(item)
    items.sort(key=lambda item: -weight[group(item)])  # stable: a group's tests keep their order
