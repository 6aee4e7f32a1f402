"""A downstream consumer needs only redis and pydantic: `connectors.client` works where PyAV is absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from connectors.publisher import Publisher
from connectors.redis_schema import StreamInfo

ROOT = Path(__file__).resolve().parents[1]

# Makes `av` (and anything under it) unimportable, as in an environment without PyAV.
NO_AV = """
import sys
class NoAV:
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, NoAV())
"""


def run_without_av(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_AV + code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_prelude_blocks_pyav():
    done = run_without_av("import av")
    assert done.returncode != 0 and "No module named 'av' (blocked)" in done.stderr, done.stderr


def test_client_imports_and_reads_redis_without_pyav(redis_url):
    with Publisher(redis_url) as pub:
        pub.register_stream(StreamInfo(id="cam1", source="rtsp://admin:pw@cam/1"))
    done = run_without_av(f"""
from connectors.client import SlowFastClient
client = SlowFastClient({redis_url!r})
print([(s.id, s.source) for s in client.streams()])
assert "av" not in sys.modules
""")
    assert done.returncode == 0, done.stderr
    assert "('cam1', 'rtsp://admin:***@cam/1')" in done.stdout
