"""Turn decoder/network exceptions into a short reason and a retry decision."""

from __future__ import annotations

from dataclasses import dataclass

import av

from ..redact import redact_text


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str
    permanent: bool  # retrying cannot help (only decides the first connect; live sources retry anyway)


# Most specific first: several of these subclass OSError.
_KNOWN: list[tuple[type[BaseException], str, bool]] = [
    (av.error.HTTPUnauthorizedError, "authorization refused (401): wrong or missing credentials", True),
    (av.error.HTTPForbiddenError, "authorization refused (403 forbidden)", True),
    (av.error.HTTPNotFoundError, "not found on the server (404)", True),
    (av.error.HTTPClientError, "request refused by the server", True),
    (av.error.HTTPServerError, "server error", False),
    (av.error.FileNotFoundError, "file not found", True),
    (av.error.IsADirectoryError, "is a directory, not a file", True),
    (av.error.PermissionError, "permission denied", True),
    (av.error.ProtocolNotFoundError, "protocol not supported by this FFmpeg build", True),
    (av.error.DemuxerNotFoundError, "container format not supported", True),
    (av.error.InvalidDataError, "not a readable media file (invalid data)", True),
    (av.error.ConnectionRefusedError, "connection refused", False),
    (av.error.ConnectionResetError, "connection reset", False),
    (av.error.ExitError, "timed out", False),
    (av.error.TimeoutError, "timed out", False),
    (av.error.EOFError, "stream ended", False),
]


def classify(exc: BaseException) -> Failure:
    """Reason text never includes the URL PyAV puts in its messages (it may hold a password)."""
    for kind, reason, permanent in _KNOWN:
        if isinstance(exc, kind):
            return Failure(reason, permanent)
    if isinstance(exc, av.error.FFmpegError):
        return Failure(f"FFmpeg error: {exc.strerror}", False)
    if isinstance(exc, OSError) and exc.strerror:
        return Failure(exc.strerror, False)
    return Failure(redact_text(f"{type(exc).__name__}: {exc}"), False)
