"""Bridge settings: each is a `tokenwire bridge` flag with a TOKENWIRE_* environment variable behind it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TOKENWIRE_{name}", default)


@dataclass
class BridgeSettings:
    # The gRPC server the bridge translates for (host:port).
    grpc_target: str = field(default_factory=lambda: _env("SERVER", DEFAULT_GRPC_TARGET))
    http_host: str = field(default_factory=lambda: _env("HTTP_HOST", "127.0.0.1"))
    http_port: int = field(default_factory=lambda: int(_env("HTTP_PORT", "8000")))
    # While a stream waits for the next gRPC message (queued, model loading), an SSE comment is
    # sent this often so that proxies and browsers do not drop an idle connection.
    heartbeat_s: float = field(default_factory=lambda: float(_env("HEARTBEAT_S", "2.0")))
    # Largest request body accepted; bigger ones get 413.
    max_body_bytes: int = field(default_factory=lambda: int(_env("MAX_BODY_BYTES", str(1 << 20))))
    # Retry-After (seconds) sent with 429 when the server gives no hint of its own.
    retry_after_s: int = field(default_factory=lambda: int(_env("RETRY_AFTER_S", "1")))
    # The model server's Prometheus endpoint, appended to the bridge's /metrics ("" = bridge only).
    server_metrics_url: str = field(
        default_factory=lambda: _env("SERVER_METRICS_URL", "http://127.0.0.1:9464/metrics"))
    static_dir: Path = STATIC_DIR

    def validate(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 s, got {self.heartbeat_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max body size must be >= 1024 bytes, got {self.max_body_bytes}")
        if self.retry_after_s < 0:
            raise ValueError(f"Retry-After must be >= 0 s, got {self.retry_after_s}")
