"""Server settings: each is a CLI flag with a TOKENWIRE_* environment variable behind it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.server.chats.db import default_database
from tokenwire.server.models.store import default_store_path


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TOKENWIRE_{name}", default)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float) -> float:
    """Seconds from "300", "90s", "5m", "1h" or "-1" (as Ollama's keep_alive); ValueError otherwise."""
    if isinstance(text, int | float):
        return float(text)
    value = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].strip():
            try:
                return float(value[: -len(unit)]) * _UNITS[unit]
            except ValueError:
                break
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use seconds, or 90s, 5m, 1h; negative = forever)") from None


_SIZES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """Bytes from "1073741824", "512M", "8G", "8GiB", "1.5g"; ValueError otherwise."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SIZES.get(value[-1:], 1) if value else 1
    number = value[:-1] if scale != 1 else value
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes, or 512M, 8G)") from None


@dataclass
class ServerConfig:
    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("PORT", "50051")))
    models_dir: Path = field(default_factory=default_store_path)
    device: str = field(default_factory=lambda: _env("DEVICE", "cpu"))
    threads: int = field(default_factory=lambda: int(_env("THREADS", "0")))
    # Linear kernels of fast int4 graphs on CPU: auto (tokenwire's native ones where the CPU has
    # AVX2 or AVX-512 and a C compiler is present, else onnxruntime's), native, or onnxruntime.
    kernels: str = field(default_factory=lambda: _env("KERNELS", "auto"))
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
    # Models loaded at once (0 = no limit); one more unloads the least recently used idle one.
    max_loaded_models: int = field(default_factory=lambda: int(_env("MAX_LOADED_MODELS", "3")))
    # Memory for loaded models, in bytes (0 = no budget); same eviction as max_loaded_models.
    memory_budget_bytes: int = field(default_factory=lambda: parse_bytes(_env("MEMORY_BUDGET_BYTES", "0")))
    # How long an idle model stays loaded, seconds ("5m", "1h" too; negative = until unloaded);
    # a request's keep_alive_s overrides it.
    keep_alive_s: float = field(default_factory=lambda: parse_duration(_env("KEEP_ALIVE", "300")))
    # The chat database: a path (SQLite) or a playhouse.db_url URL (env TOKENWIRE_DATABASE).
    database: str = field(default_factory=default_database)

    def scheduler_config(self):
        from tokenwire.server.engine.scheduler import SchedulerConfig

        return SchedulerConfig(
            max_batch=self.max_batch,
            queue_size=self.queue_size,
            prefill_chunk=self.prefill_chunk,
            max_streams_per_user=self.max_streams_per_user,
            prefix_cache_bytes=self.prefix_cache_bytes,
        )

    def model_limits(self):
        from tokenwire.server.models.manager import ModelLimits

        return ModelLimits(max_loaded=self.max_loaded_models, memory_budget_bytes=self.memory_budget_bytes,
                           keep_alive_s=self.keep_alive_s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
