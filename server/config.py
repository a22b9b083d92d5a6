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
    # Sequences decoded together in one batched step (per model).
    max_batch: int = field(default_factory=lambda: int(_env("MAX_BATCH", "16")))
    # Requests that may wait per model; one more is refused with RESOURCE_EXHAUSTED.
    queue_size: int = field(default_factory=lambda: int(_env("QUEUE_SIZE", "32")))
    # Prompt tokens prefilled per scheduler step (long prompts are split so streams keep flowing).
    prefill_chunk: int = field(default_factory=lambda: int(_env("PREFILL_CHUNK", "512")))
    # Concurrent streams per user (0 = no limit); extra requests wait their turn.
    max_streams_per_user: int = field(default_factory=lambda: int(_env("MAX_STREAMS_PER_USER", "0")))
    # Memory for the KV state of finished turns (prefix reuse); 0 turns reuse off.
    prefix_cache_bytes: int = field(default_factory=lambda: int(_env("PREFIX_CACHE_BYTES", str(512 << 20))))
    default_max_tokens: int = field(default_factory=lambda: int(_env("DEFAULT_MAX_TOKENS", "1024")))
    # The largest prompt accepted (bytes of text); bigger ones get INVALID_ARGUMENT.
    max_request_bytes: int = field(default_factory=lambda: int(_env("MAX_REQUEST_BYTES", str(1 << 20))))
    # Prometheus /metrics on this port (same host); 0 turns it off.
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "9464")))
    # Transport limit: gRPC refuses larger messages itself (RESOURCE_EXHAUSTED).
    max_message_bytes: int = field(default_factory=lambda: int(_env("MAX_MESSAGE_BYTES", str(4 << 20))))

    def scheduler_config(self):
        from .scheduler import SchedulerConfig

        return SchedulerConfig(
            max_batch=self.max_batch,
            queue_size=self.queue_size,
            prefill_chunk=self.prefill_chunk,
            max_streams_per_user=self.max_streams_per_user,
            prefix_cache_bytes=self.prefix_cache_bytes,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
