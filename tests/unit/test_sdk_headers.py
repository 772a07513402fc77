"""metabridge.sdk.codec.Headers: case-insensitive keys, copy and update_from."""

from __future__ import annotations

from metabridge.sdk.codec import Headers


def test_keys_are_case_insensitive_and_values_strings():
    headers = Headers({"Interface": "a.B", "Retries": 3})
    assert headers["interface"] == "a.B" and headers.get("INTERFACE") == "a.B"
    assert headers["retries"] == "3" and "RETRIES" in headers and 3 not in headers
    assert list(headers) == ["interface", "retries"]


def test_copy_is_independent():
    headers = Headers({"a": "1"})
    copy = headers.copy()
    copy["b"] = "2"
    assert dict(headers) == {"a": "1"} and dict(copy) == {"a": "1", "b": "2"}


def test_update_from_adds_and_replaces_and_keeps_the_source():
    source = Headers({"Method": "echo", "interface": "a.B"})
    target = Headers({"method": "old", "group": "g"})
    target.update_from(source)
    assert dict(target) == {"method": "echo", "group": "g", "interface": "a.B"}
    target["method"] = "changed"
    assert source["method"] == "echo", "the source is not shared"
