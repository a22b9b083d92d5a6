"""The router of a tokenwire cluster: an HAProxy configuration in front of the replicas.

Why HAProxy (Debian's 2.6): one process routes both front doors, HTTP/1.1 (the page, SSE, the
OpenAI and chats APIs) and gRPC (HTTP/2 end to end); it hashes a header on a consistent-hash ring
(`balance hdr(...)` + `hash-type consistent`: adding a replica moves about 1/N of the chats); its
health checks are active (a replica that is starting, draining or dead gets no new work within
about a second, and rejoins when its check passes again); it relays responses as they come (no
buffering of SSE or gRPC streams); and it exports Prometheus metrics itself. nginx's open-source
build has consistent hashing but only passive health checks, and buffers proxied responses
unless told not to on every route.

Requests are spread in two ways: those carrying `x-tokenwire-affinity` (a chat id or a
conversation's hash, set by the bridge and the CLI) are hashed onto the ring; those without one
go to the replica with the fewest connections. HTTP goes to any bridge (they hold no state), and
each bridge reaches the servers through the gRPC front door, so a chat's turns reach the same
server whether they come over HTTP or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire import affinity

CHECK_INTERVAL_MS = 500  # a dead replica is out after FALL failed checks, back after RISE good ones
FALL, RISE = 2, 2


@dataclass(frozen=True)
class Replica:
    name: str
    grpc_port: int  # the server's gRPC port
    ready_port: int  # the server's metrics listener: GET /readyz is 200 while it takes calls
    http_port: int  # its bridge's HTTP port (GET /readyz)


def _servers(replicas: list[Replica], grpc: bool) -> str:
    lines = []
    for r in replicas:
        if grpc:
            lines.append(f"    server {r.name} 127.0.0.1:{r.grpc_port} proto h2 check port {r.ready_port} "
                         f"check-proto h1")
        else:
            lines.append(f"    server {r.name} 127.0.0.1:{r.http_port} check")
    return "\n".join(lines)


def _check() -> str:
    """The active check of a backend's servers: GET /readyz (HTTP/1.1, Host 127.0.0.1) must be 200."""
    return ("    option httpchk\n    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host 127.0.0.1\n"
            f"    http-check expect status 200\n"
            f"    default-server inter {CHECK_INTERVAL_MS} fastinter {CHECK_INTERVAL_MS} downinter 1s "
            f"fall {FALL} rise {RISE}")


def render(replicas: list[Replica], http_port: int, grpc_port: int, stats_port: int = 0,
           host: str = "127.0.0.1") -> str:
    """haproxy.cfg for the front doors host:http_port (HTTP) and host:grpc_port (gRPC)."""
    header = affinity.HEADER
    stats = f"""
frontend stats
    bind {host}:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /stats
    stats refresh 5s
""" if stats_port else ""
    return f"""# Written by `tokenwire cluster` (clients/haproxy_config.py); see that module for the reasons.
global
    maxconn 4096
    log stderr format short local0 warning

defaults
    mode http
    log global
    option dontlognull
    # Send each piece of a stream at once: without it HAProxy may hold small writes (a token's SSE
    # event, a gRPC message) up to ~200 ms to merge them.
    option http-no-delay
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 30s
    timeout queue 30s
    # A request whose replica cannot be reached is sent to another one.
    retries 2
    option redispatch 1

frontend http_front
    bind {host}:{http_port}
    default_backend bridges

backend bridges
    balance leastconn
{_check()}
{_servers(replicas, grpc=False)}

frontend grpc_front
    bind {host}:{grpc_port} proto h2
    use_backend servers_by_affinity if {{ req.hdr({header}) -m found }}
    default_backend servers_by_load

backend servers_by_affinity
    balance hdr({header})
    hash-type consistent
{_check()}
{_servers(replicas, grpc=True)}

backend servers_by_load
    balance leastconn
{_check()}
{_servers(replicas, grpc=True)}
{stats}"""
