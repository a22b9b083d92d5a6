"""Prometheus metrics of the server: queues, batches, latencies, tokens, prefix reuse (memory and disk), loads.

The scheduler and the model manager report through a `Metrics` object (a no-op by default),
so the domain code does not depend on how the figures are exported.
"""

from __future__ import annotations

import logging

from tokenwire.hosts import HostPolicy, bearer_matches

log = logging.getLogger("tokenwire.metrics")
_HEADERS = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY")]

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)


class Metrics:
    """No-op base: every hook the domain calls."""

    def queue_length(self, model: str, n: int) -> None: ...
    def batch_size(self, model: str, n: int) -> None: ...
    def time_to_first_token(self, model: str, seconds: float) -> None: ...
    def inter_token_latency(self, model: str, seconds: float) -> None: ...
    def tokens_generated(self, model: str, n: int) -> None: ...
    def request_finished(self, model: str, reason: str) -> None: ...
    def prefix_cache(self, model: str, hit: bool, reused_tokens: int) -> None: ...
    def prefix_cache_state(self, model: str, entries: int, nbytes: int, evictions: int) -> None: ...
    def kv_disk(self, model: str, hit: bool, reused_tokens: int, seconds: float) -> None: ...
    def kv_disk_write(self, model: str, result: str, nbytes: int) -> None: ...
    def kv_disk_state(self, files: int, nbytes: int, evictions: int) -> None: ...
    def kv_memory(self, model: str, allocated: int, used: int, reserved: int, positions: int) -> None: ...
    def model_loaded(self, model: str, seconds: float) -> None: ...
    def capacity(self, model: str, max_rows: int, prefix_budget_bytes: int) -> None: ...


class PrometheusMetrics(Metrics):
    def __init__(self, registry=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._queue = Gauge("tokenwire_queue_length", "Requests waiting for a slot", ["model"], registry=r)
        self._batch = Gauge("tokenwire_batch_size", "Sequences in the running batch", ["model"], registry=r)
        self._ttft = Histogram("tokenwire_time_to_first_token_seconds", "From request received to first token",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("tokenwire_inter_token_latency_seconds", "Between two tokens of one stream",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self._tokens = Counter("tokenwire_tokens_generated", "Tokens generated", ["model"], registry=r)
        self._requests = Counter("tokenwire_requests", "Finished requests by finish reason",
                                 ["model", "finish_reason"], registry=r)
        self._prefix = Counter("tokenwire_prefix_cache_lookups", "Prefix-cache lookups by result",
                               ["model", "result"], registry=r)
        self._reused = Counter("tokenwire_prefix_cache_reused_tokens", "Prompt tokens not recomputed",
                               ["model"], registry=r)
        self._kv = Gauge("tokenwire_kv_bytes", "KV cache of the running sequences: allocated (what the process "
                         "holds), used (the sequences' own pages), reserved (prompt + max_tokens of each, what "
                         "admission counts against the memory budget)", ["model", "kind"], registry=r)
        self._kv_positions = Gauge("tokenwire_kv_positions", "Positions (tokens) the running sequences hold",
                                   ["model"], registry=r)
        self._prefix_entries = Gauge("tokenwire_prefix_cache_entries", "Cached prefixes", ["model"], registry=r)
        self._prefix_bytes = Gauge("tokenwire_prefix_cache_bytes", "Memory held by cached prefixes", ["model"],
                                   registry=r)
        self._evictions = Gauge("tokenwire_prefix_cache_evictions", "Prefixes evicted so far", ["model"], registry=r)
        # The disk tier (engine/kv_disk.py): chats' KV kept across restarts.
        self._kv_disk = Counter("tokenwire_kv_disk_lookups", "Disk-tier lookups (a chat turn the memory cache "
                                "could not serve) by result", ["model", "result"], registry=r)
        self._kv_disk_reused = Counter("tokenwire_kv_disk_reused_tokens", "Prompt tokens restored from disk, not "
                                       "recomputed", ["model"], registry=r)
        self._kv_disk_load = Histogram("tokenwire_kv_disk_load_seconds", "Time to find, read and check a chat's KV "
                                       "file (hits)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self._kv_disk_writes = Counter("tokenwire_kv_disk_writes", "KV files written behind finished turns, by "
                                       "result (written, dropped: queue full, failed)", ["model", "result"],
                                       registry=r)
        self._kv_disk_written = Counter("tokenwire_kv_disk_written_bytes", "Bytes of KV files written", ["model"],
                                        registry=r)
        self._kv_disk_files = Gauge("tokenwire_kv_disk_files", "KV files on disk", registry=r)
        self._kv_disk_bytes = Gauge("tokenwire_kv_disk_bytes", "Disk held by KV files", registry=r)
        self._kv_disk_evictions = Gauge("tokenwire_kv_disk_evictions", "KV files evicted by the disk budget so far",
                                        registry=r)
        self._load = Histogram("tokenwire_model_load_seconds", "Time to load a model", ["model"],
                               buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        # The replica's totals, named and typed as the Gateway API inference extension's model server
        # protocol asks (vLLM's names with our prefix): what a router or an autoscaler reads.
        self._models: dict[str, dict[str, float]] = {}
        for name, what, value in (
            ("tokenwire:num_requests_waiting", "Requests waiting for a slot, all models (TotalQueuedRequests)",
             lambda: self._total("waiting")),
            ("tokenwire:num_requests_running", "Sequences being decoded, all models (TotalRunningRequests)",
             lambda: self._total("running")),
            ("tokenwire:kv_cache_usage_perc", "Share of the loaded models' KV rows in use, 0 to 1 (KVCacheUtilization)",
             lambda: self._share("running", "max_rows")),
            ("tokenwire:prefix_cache_usage_perc", "Share of the prefix caches' memory budget held, 0 to 1",
             lambda: self._share("prefix_bytes", "prefix_budget")),
        ):
            Gauge(name, what, registry=r).set_function(value)
        self.ready = False  # /readyz: serving and not draining (set by the server)

    def _set(self, model: str, **values: float) -> None:
        self._models.setdefault(model, {}).update(values)

    def _total(self, key: str) -> float:
        return sum(m.get(key, 0) for m in list(self._models.values()))

    def _share(self, used: str, of: str) -> float:
        whole = self._total(of)
        return min(1.0, self._total(used) / whole) if whole else 0.0

    def queue_length(self, model: str, n: int) -> None:
        self._queue.labels(model).set(n)
        self._set(model, waiting=n)

    def batch_size(self, model: str, n: int) -> None:
        self._batch.labels(model).set(n)
        self._set(model, running=n)

    def capacity(self, model: str, max_rows: int, prefix_budget_bytes: int) -> None:
        """A model's scheduler started (its rows and prefix budget) or stopped (zeros)."""
        self._set(model, max_rows=max_rows, prefix_budget=prefix_budget_bytes)

    def time_to_first_token(self, model: str, seconds: float) -> None:
        self._ttft.labels(model).observe(seconds)

    def inter_token_latency(self, model: str, seconds: float) -> None:
        self._itl.labels(model).observe(seconds)

    def tokens_generated(self, model: str, n: int) -> None:
        self._tokens.labels(model).inc(n)

    def request_finished(self, model: str, reason: str) -> None:
        self._requests.labels(model, reason).inc()

    def prefix_cache(self, model: str, hit: bool, reused_tokens: int) -> None:
        self._prefix.labels(model, "hit" if hit else "miss").inc()
        if reused_tokens:
            self._reused.labels(model).inc(reused_tokens)

    def kv_memory(self, model: str, allocated: int, used: int, reserved: int, positions: int) -> None:
        for kind, value in (("allocated", allocated), ("used", used), ("reserved", reserved)):
            self._kv.labels(model, kind).set(value)
        self._kv_positions.labels(model).set(positions)

    def prefix_cache_state(self, model: str, entries: int, nbytes: int, evictions: int) -> None:
        self._prefix_entries.labels(model).set(entries)
        self._prefix_bytes.labels(model).set(nbytes)
        self._set(model, prefix_bytes=nbytes)
        self._evictions.labels(model).set(evictions)

    def kv_disk(self, model: str, hit: bool, reused_tokens: int, seconds: float) -> None:
        self._kv_disk.labels(model, "hit" if hit else "miss").inc()
        if hit:
            self._kv_disk_reused.labels(model).inc(reused_tokens)
            self._kv_disk_load.labels(model).observe(seconds)

    def kv_disk_write(self, model: str, result: str, nbytes: int) -> None:
        self._kv_disk_writes.labels(model, result).inc()
        if nbytes:
            self._kv_disk_written.labels(model).inc(nbytes)

    def kv_disk_state(self, files: int, nbytes: int, evictions: int) -> None:
        self._kv_disk_files.set(files)
        self._kv_disk_bytes.set(nbytes)
        self._kv_disk_evictions.set(evictions)

    def model_loaded(self, model: str, seconds: float) -> None:
        self._load.labels(model).observe(seconds)

    def serve_http(self, host: str, port: int, policy: HostPolicy | None = None, token: str = "") -> bool:
        """Serves /metrics (and /readyz: 200 while the server takes calls, else 503) on host:port,
        in a thread; a port in use is logged, not fatal. Requests
        whose Host or Origin the policy refuses get 403 (DNS rebinding); with a `token`, requests
        without `Authorization: Bearer <token>` get 401."""
        import threading
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        exposition = make_wsgi_app(self.registry)
        policy = policy or HostPolicy(host)

        def guarded(environ, start_response):
            why = policy.refusal(environ.get("HTTP_HOST"), environ.get("HTTP_ORIGIN"))
            if why:
                start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), *_HEADERS])
                return [why.encode()]
            if environ.get("PATH_INFO") == "/readyz":  # for a router's health checks: says nothing secret
                ready = self.ready
                start_response("200 OK" if ready else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"), *_HEADERS])
                return [b"ready\n" if ready else b"not ready: starting or draining\n"]
            if not bearer_matches(environ.get("HTTP_AUTHORIZATION"), token):
                start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                                    ("WWW-Authenticate", 'Bearer realm="tokenwire metrics"'), *_HEADERS])
                return [b"this metrics endpoint needs its scrape token: Authorization: Bearer <token>"]
            return exposition(environ, lambda status, headers, *rest: start_response(status, [*headers, *_HEADERS],
                                                                                     *rest))

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
                pass

        try:
            server = make_server(host, port, guarded, server_class=Server, handler_class=QuietHandler)
        except OSError as exc:
            log.warning("metrics endpoint not started on %s:%d: %s", host, port, exc)
            return False
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", host, port)
        return True
