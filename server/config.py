"""The server's settings, declared once: every field is a `tokenwire serve` flag and a TOKENWIRE_*
environment variable (see settings.py), nesting the scheduler's and the model manager's own.

`tokenwire serve --help` lists them all; `tokenwire up` forwards the whole configuration to the
server it starts (settings.to_argv), so no setting can be dropped on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.server.chats.db import default_database, default_database_path
from tokenwire.server.chats.store import DEFAULT_MAX_CHAT_BYTES
from tokenwire.server.engine.scheduler import SchedulerConfig
from tokenwire.server.models.manager import ModelLimits
from tokenwire.server.models.store import default_store_path
from tokenwire.server.settings import parse_bytes, parse_duration, setting


@dataclass
class ServerConfig:
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50051, "gRPC port")
    models_dir: Path = setting(default_store_path, "the model store", env="MODELS",
                               parse=lambda text: Path(text).expanduser())
    device: str = setting("cpu", "execution provider", choices=("cpu", "cuda"))
    threads: int = setting(0, "onnxruntime intra-op threads, 0 = all cores")
    kernels: str = setting("auto", "linear kernels of int4 models on CPU: tokenwire's native ones (AVX2/AVX-512) "
                           "when available (auto), required (native), or onnxruntime's",
                           choices=("auto", "native", "onnxruntime"))
    default_max_tokens: int = setting(1024, "max tokens when a request sets none")
    max_request_bytes: int = setting(1 << 20, "largest prompt accepted (bytes of text, or 512K, 1M); bigger "
                                     "ones get INVALID_ARGUMENT", parse=parse_bytes)
    metrics_port: int = setting(9464, "Prometheus /metrics port (same host), 0 = off")
    metrics_token: str = setting("", "scrape token: /metrics then needs `Authorization: Bearer <token>` (Prometheus's "
                                 "bearer_token); empty = open to whoever reaches its (loopback) port")
    allowed_hosts: str = setting("", "host names (comma-separated, * wildcards) the metrics listener answers "
                                 "besides loopback names and the bind address; '*' = any (DNS-rebinding defence)")
    insecure_open: bool = setting(False, "serve a non-loopback address without API keys (anyone who reaches it "
                                  "can read and delete every chat); without it such a bind needs `tokenwire keys "
                                  "create` first")
    max_message_bytes: int = setting(4 << 20, "largest gRPC message (bytes, or 4M); gRPC refuses bigger ones "
                                     "with RESOURCE_EXHAUSTED", parse=parse_bytes)
    drain_s: float = setting(30.0, "shutdown grace: on SIGTERM/Ctrl-C running replies may finish this long "
                             "(seconds, or 30s, 1m) before the rest are cancelled, keeping their text; a second "
                             "signal stops at once", flag="--drain", env="DRAIN", parse=parse_duration)
    detached_reply_s: float = setting(60.0, "a chat reply whose client went away goes on this long (seconds, or "
                                      "1m) with nobody watching (WatchReply, the page's reconnect) before it is "
                                      "stopped, kept as far as it went; meanwhile it holds its user's stream slot",
                                      parse=parse_duration)
    tls_cert: str = setting("", "PEM certificate (chain) to serve gRPC over TLS, with --tls-key; clients then "
                            "need --tls-ca (or a CA their system trusts)")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    database: str = setting(default_database, "chat database: a path (SQLite) or a URL such as postgresql://...")
    max_chat_bytes: int = setting(DEFAULT_MAX_CHAT_BYTES, "largest chat kept (its messages' text, bytes, or 64M); "
                                  "a message that would pass it is refused (start a new chat); 0 = no cap",
                                  parse=parse_bytes)
    max_audio_seconds: float = setting(600.0, "longest audio transcribed (seconds, or 10m); longer is refused "
                                       "(HTTP 413) before it is decoded", parse=parse_duration)
    max_audio_bytes: int = setting(25 << 20, "largest audio file transcribed (bytes, or 25M); bigger is refused "
                                   "(HTTP 413)", parse=parse_bytes)
    kv_disk_budget_bytes: int = setting(2 << 30, "disk for chats' KV (bytes, or 2G): a chat's next turn after a "
                                        "restart, or after its KV left memory, restores it instead of recomputing "
                                        "its history; least recently used files go first; 0 = off",
                                        parse=parse_bytes)
    kv_dir: str = setting("", "folder of the chats' KV files (0700; files 0600, deleted with their chat); empty = "
                          "kv/ beside the chat database (a SQLite path), else ~/.local/share/tokenwire/kv")
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    models: ModelLimits = field(default_factory=ModelLimits)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def kv_root(self) -> Path:
        """Where the disk tier keeps chats' KV: --kv-dir, else beside a SQLite database, else the data folder."""
        if self.kv_dir:
            return Path(self.kv_dir).expanduser()
        if "://" not in self.database:
            return Path(self.database).expanduser().resolve().parent / "kv"
        return default_database_path().parent / "kv"
