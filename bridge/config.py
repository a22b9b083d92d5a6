"""Bridge settings, declared once: each is a `tokenwire bridge` flag and a TOKENWIRE_* environment
variable (tokenwire.server.settings; the bridge uses nothing else of the server's code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenwire.hosts import HostPolicy, bind_refusal, split_list
from tokenwire.server.settings import parse_bytes, setting

DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class BridgeSettings:
    grpc_target: str = setting(DEFAULT_GRPC_TARGET, "the gRPC server the bridge translates for (host:port)",
                               flag="--server", env="SERVER")
    http_host: str = setting("127.0.0.1", "address the HTTP bridge binds")
    http_port: int = setting(8000, "HTTP port of the bridge")
    ollama_port: int = setting(11434, "port of the Ollama-compatible API (/api/chat, /api/tags, ... and /v1) on "
                               "the bridge's address; 0 = off; taken (by Ollama itself): the bridge runs without it")
    # While a stream waits for the next gRPC message (queued, model loading), an SSE comment is
    # sent this often so that proxies and browsers do not drop an idle connection.
    heartbeat_s: float = setting(2.0, "SSE keep-alive comment interval while a stream waits, seconds")
    max_body_bytes: int = setting(6 << 20, "largest request body (bytes, or 6M: room for images, base64 in "
                                  "JSON); bigger ones get 413", parse=parse_bytes)
    retry_after_s: int = setting(1, "Retry-After (seconds) sent with 429 when the server gives none")
    server_metrics_url: str = setting("http://127.0.0.1:9464/metrics", "the model server's Prometheus endpoint, "
                                      "appended to the bridge's /metrics; '' = bridge only")
    allowed_hosts: str = setting("", "host names (comma-separated, * wildcards) this bridge answers besides "
                                 "loopback names and its bind address; '*' = any (DNS-rebinding defence; a "
                                 "non-loopback bind needs it)")
    allowed_origins: str = setting("", "browser origins (comma-separated patterns, e.g. chrome-extension://*) "
                                   "allowed to call the bridge besides its own page")
    metrics_token: str = setting("", "scrape token: the bridge's /metrics then needs `Authorization: Bearer "
                                 "<token>`, and it is sent to --server-metrics-url (the server's --metrics-token)")
    tls_ca: str = setting("", "CA certificate (PEM) of a gRPC server that serves TLS (--tls-cert on serve)")
    http_tls_cert: str = setting("", "PEM certificate to serve HTTPS, with --http-tls-key")
    http_tls_key: str = setting("", "PEM private key of --http-tls-cert")
    static_dir: Path = STATIC_DIR

    def validate(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {self.heartbeat_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max body size must be >= 1024 bytes, got {self.max_body_bytes}")
        if not 0 <= self.ollama_port <= 65535:
            raise ValueError(f"--ollama-port must be a port number or 0, got {self.ollama_port}")
        if self.ollama_port and self.ollama_port == self.http_port:
            raise ValueError(f"--ollama-port {self.ollama_port} is the bridge's own --http-port")
        if self.retry_after_s < 0:
            raise ValueError(f"Retry-After must be >= 0 s, got {self.retry_after_s}")
        if why := bind_refusal(self.http_host, split_list(self.allowed_hosts)):
            raise ValueError(why)
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("HTTPS needs both --http-tls-cert and --http-tls-key")

    @property
    def host_policy(self) -> HostPolicy:
        return HostPolicy(self.http_host, split_list(self.allowed_hosts), split_list(self.allowed_origins))
