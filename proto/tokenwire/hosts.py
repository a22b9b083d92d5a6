"""Which Host and Origin headers an HTTP endpoint of tokenwire answers (DNS rebinding defence).

A web page the user visits can rebind its own name to 127.0.0.1 and then talk to a local server
with the page's name in `Host`; a page on another origin can send requests with its `Origin`.
So an endpoint answers only requests addressed to a loopback name, to the address it binds, or
to a name the operator allowed (`--allowed-hosts`, where `*` accepts any: behind a router that
checks names itself), and refuses a cross-origin `Origin` unless it is allowed
(`--allowed-origins`, patterns such as `chrome-extension://*`, as Ollama's OLLAMA_ORIGINS).
Used by the bridge and by the server's metrics listener; plain functions, no framework.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """A loopback name or address: localhost (and *.localhost), 127.0.0.0/8, ::1."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip().strip("[]") in ("", "0.0.0.0", "::")


def split_list(text: str) -> tuple[str, ...]:
    """"a, b ,c" -> ("a", "b", "c")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def hostname_of(host_header: str) -> str | None:
    """The name in a Host header ("example.com:8000" -> "example.com", "[::1]:8000" -> "::1");
    None when it is not a valid host."""
    if not host_header or any(c in host_header for c in "/?#@ \t\\"):
        return None
    try:
        parts = urlsplit("http://" + host_header)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    return (parts.hostname or "").rstrip(".").lower() or None


@dataclass(frozen=True)
class HostPolicy:
    bind_host: str
    allowed_hosts: tuple[str, ...] = ()  # names beyond loopback and the bind address; "*": any
    allowed_origins: tuple[str, ...] = ()  # Origin patterns allowed besides the same origin

    def refusal(self, host_header: str | None, origin: str | None) -> str:
        """Why a request with these headers is refused ("" when it is answered)."""
        name = hostname_of(host_header or "")
        if name is None:
            return "the request has no valid Host header"
        if not self.host_allowed(name):
            return (f"host {name!r} is not served here: tokenwire answers loopback names and the names in "
                    "--allowed-hosts (this protects against DNS rebinding)")
        if origin is not None and not self.origin_allowed(origin, host_header or ""):
            return (f"origin {origin!r} may not call this server: add it to --allowed-origins "
                    "(browser extensions and other front ends)")
        return ""

    def host_allowed(self, name: str) -> bool:
        if "*" in self.allowed_hosts or is_loopback(name):
            return True
        bind = self.bind_host.strip("[]").lower()
        if name == bind and not is_wildcard(bind):
            return True
        return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in self.allowed_hosts)

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip()
        if any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.allowed_origins):
            return True
        if origin == "null":
            return False
        try:
            parts = urlsplit(origin)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        netloc = parts.hostname if port is None else f"{parts.hostname}:{port}"
        same = _normal(netloc) == _normal(host_header)
        return same and self.host_allowed(parts.hostname.lower())


def _normal(netloc: str) -> str:
    text = netloc.strip().lower()
    return text[:-3] if text.endswith(":80") else text


def bind_refusal(bind_host: str, allowed_hosts: tuple[str, ...]) -> str:
    """Why an HTTP listener may not bind `bind_host` as configured ("" when it may): a
    non-loopback address needs the names clients use (--allowed-hosts)."""
    if is_loopback(bind_host) or allowed_hosts:
        return ""
    return (f"binding {bind_host} exposes tokenwire beyond this machine: name the host names clients use with "
            "--allowed-hosts (or '*' to accept any, behind a router that checks them)")


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header carries `Bearer <token>` (compared in constant time);
    always True when no token is set."""
    if not token:
        return True
    scheme, _, given = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
