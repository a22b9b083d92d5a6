"""Server settings: each is a CLI flag with a TOKENWIRE_* environment variable behind it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .store import default_store_path


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TOKENWIRE_{name}", default)


@dataclass
class ServerConfig:
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("PORT", "50051")))
    models_dir: Path = field(default_factory=default_store_path)
    device: str = field(default_factory=lambda: _env("DEVICE", "cpu"))
    threads: int = field(default_factory=lambda: int(_env("THREADS", "0")))
    max_running: int = field(default_factory=lambda: int(_env("MAX_RUNNING", "4")))
    queue_size: int = field(default_factory=lambda: int(_env("QUEUE_SIZE", "32")))
    default_max_tokens: int = field(default_factory=lambda: int(_env("DEFAULT_MAX_TOKENS", "1024")))
    # The largest prompt accepted (bytes of text); bigger ones get INVALID_ARGUMENT.
    max_request_bytes: int = field(default_factory=lambda: int(_env("MAX_REQUEST_BYTES", str(1 << 20))))
    # Transport limit: gRPC refuses larger messages itself (RESOURCE_EXHAUSTED).
    max_message_bytes: int = field(default_factory=lambda: int(_env("MAX_MESSAGE_BYTES", str(4 << 20))))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
