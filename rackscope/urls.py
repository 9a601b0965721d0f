"""URLs as they may be shown or stored: credentials in the userinfo (and the query) replaced by ``***``."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

REDACTED = "***"
MIN_BARE_SECRET_CHARS = 6


def redact_url(url: str) -> str:
    """``http://user:pass@host:8000/v1?key=k`` -> ``http://***@host:8000/v1?***``.

    Scheme, host, port and path are kept; the userinfo and the query (which may carry a key)
    are replaced, the fragment is dropped. Something that does not parse as a URL is not
    shown at all, since nothing says which part of it is secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return url if "@" not in url and "?" not in url else REDACTED
    host = parts.netloc.rpartition("@")[2]
    userinfo = f"{REDACTED}@" if "@" in parts.netloc else ""
    query = f"?{REDACTED}" if parts.query else ""
    return f"{parts.scheme}://{userinfo}{host}{parts.path}{query}"


def has_credentials(url: str) -> bool:
    """True when ``url`` carries a userinfo or a query that ``redact_url`` hides."""
    return redact_url(url) != url


def redact_in(text: str, url: str | None) -> str:
    """``text`` (an error message, a log line) with ``url`` and its secret parts replaced, for
    messages built by code that saw the real URL."""
    if not url or not has_credentials(url):
        return text
    text = text.replace(url, redact_url(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        return text.replace(url, REDACTED)
    userinfo = parts.netloc.rpartition("@")[0]
    for form in {userinfo, unquote(userinfo)} - {""}:
        text = text.replace(f"{form}@", f"{REDACTED}@")
    # A bare secret is replaced wherever it appears only when it is long enough not to be an
    # ordinary word of the message.
    password = userinfo.partition(":")[2]
    for secret in sorted({userinfo, unquote(userinfo), password, unquote(password), parts.query,
                          unquote(parts.query)}, key=len, reverse=True):
        if len(secret) >= MIN_BARE_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    return text
