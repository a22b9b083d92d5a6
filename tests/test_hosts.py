"""The Host/Origin policy (tokenwire.hosts) on its own: the cases DNS rebinding and cross-origin
pages produce, and the look-alikes that must not pass."""

from __future__ import annotations

import pytest

from tokenwire.hosts import HostPolicy, bind_refusal, hostname_of, is_loopback

LOCAL = HostPolicy("127.0.0.1")


@pytest.mark.parametrize("header,name", [
    ("localhost:8000", "localhost"), ("LOCALHOST", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("[::1]:8000", "::1"), ("example.com.:80", "example.com"),
    ("", None), ("a b", None), ("127.0.0.1:port", None), ("127.0.0.1@evil.example", None), ("x/y", None),
])
def test_hostname_of(header: str, name: str | None) -> None:
    assert hostname_of(header) == name


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "127.1.2.3", "[::1]:8000", "app.localhost"])
def test_loopback_names_are_answered(host: str) -> None:
    assert LOCAL.refusal(host, None) == ""


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.evil.example",
                                  "0.0.0.0:8000", "192.168.1.5", "", None])
def test_other_names_are_refused(host: str | None) -> None:
    assert LOCAL.refusal(host, None)


def test_origins() -> None:
    assert LOCAL.refusal("127.0.0.1:8000", "http://127.0.0.1:8000") == ""  # the page itself
    assert "origin" in LOCAL.refusal("127.0.0.1:8000", "http://evil.example")
    assert "origin" in LOCAL.refusal("127.0.0.1:8000", "http://localhost:8000")  # another origin
    assert "origin" in LOCAL.refusal("127.0.0.1:8000", "null")
    assert "origin" in LOCAL.refusal("127.0.0.1:8000", "http://127.0.0.1:9999")
    extension = HostPolicy("127.0.0.1", allowed_origins=("chrome-extension://*",))
    assert extension.refusal("127.0.0.1:8000", "chrome-extension://abcdef") == ""
    assert extension.refusal("127.0.0.1:8000", "http://evil.example")


def test_allowed_hosts_and_the_bind_address() -> None:
    lan = HostPolicy("0.0.0.0", allowed_hosts=("tokenwire.lan", "*.corp.example"))
    assert lan.refusal("tokenwire.lan:8000", None) == "" and lan.refusal("gpu1.corp.example", None) == ""
    assert lan.refusal("evil.example", None) and lan.refusal("0.0.0.0", None)
    assert HostPolicy("10.0.0.7").refusal("10.0.0.7:8000", None) == ""
    assert HostPolicy("0.0.0.0", allowed_hosts=("*",)).refusal("anything.example", None) == ""


def test_a_non_loopback_bind_needs_its_names() -> None:
    assert bind_refusal("127.0.0.1", ()) == "" and bind_refusal("localhost", ()) == ""
    assert "--allowed-hosts" in bind_refusal("0.0.0.0", ())
    assert bind_refusal("0.0.0.0", ("tokenwire.lan",)) == ""
    assert is_loopback("::1") and not is_loopback("::")
