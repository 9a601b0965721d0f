"""URL redaction: what may be shown of a URL that carries credentials."""

from __future__ import annotations

import pytest

from rackscope.urls import has_credentials, redact_in, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("https://host/v1", "https://host/v1"),
        ("http://user:pass@host:8000/v1", "http://***@host:8000/v1"),
        ("http://user@host", "http://***@host"),
        ("http://a:b@c@host:1/x", "http://***@host:1/x"),
        ("http://host/v1?api_key=k#frag", "http://host/v1?***"),
        ("http://[::1]:9/v1", "http://[::1]:9/v1"),
        ("http://u:p@[::1", "***"),
        ("not a url", "not a url"),
        ("user:pass@host", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert has_credentials(url) is (shown != url)


def test_redact_in_replaces_the_url_and_its_secrets_in_messages() -> None:
    url = "http://alice:hunter2-pw@10.0.0.1:8000"
    text = f"cannot reach {url}/v1/models: refused (alice:hunter2-pw, hunter2-pw)"
    out = redact_in(text, url)
    assert "hunter2-pw" not in out and "alice" not in out
    assert "http://***@10.0.0.1:8000/v1/models" in out
    short = "http://a:b@h:1"
    assert redact_in("a bad thing at http://a:b@h:1", short) == "a bad thing at http://***@h:1"
    assert redact_in("nothing to hide", "http://h:1") == "nothing to hide"
    assert redact_in("kept", None) == "kept"
