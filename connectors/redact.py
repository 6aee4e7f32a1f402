"""Masking of credentials in URIs, for logs, errors and anything published (stream registry)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that commonly carry secrets (camera tokens, signed URLs, API keys).
_SECRET_PARAM = re.compile(r"pass|pwd|token|secret|key|auth|sig|credential|session", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """The URI with its password and secret-looking query values replaced by ***.

    The user name and host stay, so logs still say which camera; plain paths are returned
    unchanged; something that does not parse is hidden entirely rather than leaked.
    """
    uri = str(uri)
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{MASK}@{host}" if has_password else f"{userinfo}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*/:")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable uri>"


def redact_text(text: str) -> str:
    """Apply redact_uri to every URL inside free text (e.g. an FFmpeg error message)."""
    return _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
