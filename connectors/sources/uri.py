"""What a source URI points at, and whether we can open it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..redact import redact_uri
from .types import SourceError

SUPPORTED = "a file path, file://, rtsp://, rtsps://, http://, https:// (files, HLS) or loop://PATH"


class Kind(StrEnum):
    FILE = "file"
    RTSP = "rtsp"
    HTTP = "http"
    LOOP = "loop"  # a local file replayed forever in real time: a fake camera for demos/tests


@dataclass(frozen=True, slots=True)
class SourceSpec:
    uri: str  # as given (may hold credentials: never log it)
    target: str  # what av.open gets
    kind: Kind

    @property
    def display(self) -> str:
        return redact_uri(self.uri)

    @property
    def presumed_live(self) -> bool:
        """Live (drop stale work, never block) before anything is opened: cameras, loop:// and
        HLS playlists are; files and plain HTTP files are not. VideoSource.is_live refines
        HTTP once connected (an HLS stream with a duration is a file)."""
        return self.kind in (Kind.RTSP, Kind.LOOP) or (self.kind is Kind.HTTP and self.target.endswith(".m3u8"))


_SCHEMES = {"rtsp": Kind.RTSP, "rtsps": Kind.RTSP, "http": Kind.HTTP, "https": Kind.HTTP}


def parse_source(uri: str | os.PathLike[str], loop: bool = False) -> SourceSpec:
    text = os.fspath(uri)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme in _SCHEMES:
        if loop:
            raise SourceError(text, "loop=True applies to local files only")
        return SourceSpec(text, text, _SCHEMES[scheme])
    if scheme in ("", "file", "loop"):
        path = text.split("://", 1)[1] if scheme else text
        if scheme == "file":
            path = unquote(urlsplit(text).path)
        kind = Kind.LOOP if loop or scheme == "loop" else Kind.FILE
        if not Path(path).exists():
            raise SourceError(text, "file not found")
        if not Path(path).is_file():
            raise SourceError(text, "not a regular file")
        return SourceSpec(text, path, kind)
    raise SourceError(text, f"unsupported URL scheme {scheme!r} (supported: {SUPPORTED})")
