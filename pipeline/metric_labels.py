"""The `stream` label of the run's Prometheus metrics (the model worker's and the ingest actors')."""

# Ray's metrics keep every label set they were ever given, in each process that recorded it and in
# the node's metrics agent: there is no way to drop one. A file is a job that ends, and its id is
# new each time, so files count together under one label value (a stream id cannot start with
# "("); a live stream is a camera, a set the operator configures, and keeps its own. A file's own
# counts, state and progress are in its status.
FILES_LABEL = "(files)"


def stream_label(stream: str, live: bool) -> str:
    """The `stream` label value of a stream's metrics."""
    return stream if live else FILES_LABEL
