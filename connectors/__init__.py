"""The outside world: video sources decoded with PyAV, and the Redis contract."""
