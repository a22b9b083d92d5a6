"""Builds and runs the gRPC server: Inference, History, health and reflection on one grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokenwire.hosts import HostPolicy, bind_refusal, is_loopback, split_list
from tokenwire.server.api.auth import Authenticator, AuthInterceptor
from tokenwire.server.api.history import HistoryService
from tokenwire.server.api.inference import InferenceService
from tokenwire.server.api.live_replies import LiveReplies
from tokenwire.server.api.malformed import MalformedRequests
from tokenwire.server.chats.worker import ChatWorker
from tokenwire.server.engine.kv_disk import KVDiskTier
from tokenwire.server.engine.scheduler import read_shared_prompts
from tokenwire.server.engine.session import providers_for
from tokenwire.server.models.manager import ModelManager
from tokenwire.server.models.store import ModelStore
from tokenwire.v1 import history_pb2, history_pb2_grpc, inference_pb2, inference_pb2_grpc

from .config import ServerConfig
from .metrics import PrometheusMetrics

log = logging.getLogger("tokenwire.server")

KV_FLUSH_S = 10.0  # at shutdown, how long the KV files still queued may take to be written


def open_chat_store(config: ServerConfig) -> ChatWorker:
    chats = ChatWorker.open(config.database)
    chats.store.max_chat_bytes = config.max_chat_bytes
    interrupted = chats.store.interrupted_at_start
    log.info("chat database %s%s", chats.store.describe(),
             f" ({interrupted} unfinished replies marked interrupted)" if interrupted else "")
    return chats


def open_kv_disk(config: ServerConfig, metrics: PrometheusMetrics) -> KVDiskTier | None:
    """The disk tier of chats' KV, or None: turned off, or its folder cannot be made (a read-only
    file system): then chats are served as before, recomputed after a restart, and the log says why."""
    if config.kv_disk_budget_bytes <= 0:
        return None
    try:
        tier = KVDiskTier(config.kv_root, config.kv_disk_budget_bytes, metrics)
    except OSError as exc:
        log.warning("chats' KV is kept in memory only: cannot use %s (%s); set --kv-dir to a writable folder",
                    config.kv_root, exc)
        return None
    log.info("chats' KV kept on disk in %s (%.1f GB budget, %d files there)", tier.root,
             config.kv_disk_budget_bytes / 1e9, tier.stats.files)
    return tier


@dataclass
class Running:
    """A started server and the parts its shutdown needs."""

    server: grpc.aio.Server
    models: ModelManager
    health: health.aio.HealthServicer
    inference: InferenceService
    metrics: PrometheusMetrics
    kv_disk: KVDiskTier | None = None  # chats' KV on disk (None: --kv-disk-budget-bytes 0)


async def start_server(config: ServerConfig, chats: ChatWorker | None = None) -> Running:
    providers_for(config.device)  # fail at start, with a clear message, when the device is missing
    if not config.detached_reply_s >= 0:
        raise OSError(f"--detached-reply-s must be >= 0 seconds, got {config.detached_reply_s}")
    try:
        read_shared_prompts(config.scheduler.shared_prefix_file)  # read again at each model load
    except (OSError, ValueError) as exc:
        raise OSError(f"--shared-prefix-file: {exc}") from exc
    chats = chats or open_chat_store(config)
    if not is_loopback(config.host) and not config.insecure_open and not await chats.call(chats.keys.required):
        raise OSError(f"refusing to serve {config.host} without API keys: anyone who reaches it could read every "
                      "chat. Create a key (`tokenwire keys create NAME`) or pass --insecure-open")
    why = bind_refusal(config.host, split_list(config.allowed_hosts))
    if config.metrics_port and why:
        raise OSError(f"metrics listener: {why}")
    metrics = PrometheusMetrics()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port,
                           HostPolicy(config.host, split_list(config.allowed_hosts)), token=config.metrics_token)
    kv_disk = open_kv_disk(config, metrics)
    manager = ModelManager(
        ModelStore(config.models_dir), device=config.device, threads=config.threads, kernels=config.kernels,
        scheduler_config=config.scheduler, metrics=metrics, limits=config.models, kv_disk=kv_disk,
    )
    auth = Authenticator(chats)
    server = grpc.aio.server(
        # First MalformedRequests (bytes that are not the request type: INVALID_ARGUMENT, not UNKNOWN),
        # around the key check, whose refusals it then covers too.
        interceptors=[MalformedRequests(), AuthInterceptor(auth)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
    )
    replies = LiveReplies()  # chat replies being written: Inference starts them, History watches and stops them
    inference = InferenceService(config, manager, chats, auth, replies)
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    # A deleted chat's KV files go with it (the engine knows no chats: the History service is told whom to call).
    history_pb2_grpc.add_HistoryServicer_to_server(
        HistoryService(chats, auth, on_chat_deleted=kv_disk.delete_chat if kv_disk is not None else None,
                       replies=replies), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (
        inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
        history_pb2.DESCRIPTOR.services_by_name["History"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, server)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise OSError("TLS needs both --tls-cert and --tls-key")
    if config.tls_cert:
        pair = (Path(config.tls_key).expanduser().read_bytes(), Path(config.tls_cert).expanduser().read_bytes())
        bound = server.add_secure_port(config.address, grpc.ssl_server_credentials([pair]))
    else:
        bound = server.add_insecure_port(config.address)
    if bound == 0:
        raise OSError(f"cannot listen on {config.address} (port in use?)")
    config.port = bound
    await server.start()
    for name in ("", *service_names[:2]):  # the server, Inference, History
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics.ready = True
    return Running(server, manager, health_servicer, inference, metrics, kv_disk)


async def serve(config: ServerConfig, on_ready=None) -> None:
    chats = open_chat_store(config)
    running = await start_server(config, chats)
    log.info("tokenwire server listening on %s (models: %s)", config.address, config.models_dir)
    if on_ready is not None:
        on_ready(config)
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first signal drains, a second one stops at once
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):
            pass
    waiter = asyncio.ensure_future(running.server.wait_for_termination())
    await asyncio.wait([waiter, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    await drain(running, config.drain_s, hurry)
    running.models.close()
    if running.kv_disk is not None:  # the finished turns' KV still queued goes to disk first
        running.kv_disk.close(timeout=KV_FLUSH_S)
    chats.close()  # after the last replies are stored


async def drain(running: Running, grace_s: float, hurry: asyncio.Event) -> None:
    """Stops taking calls (health says NOT_SERVING, so a router sends no more), lets the running
    ones (and chat replies nobody watches any more) finish within `grace_s`, then cancels the rest:
    their replies are stored as far as they went. `hurry` (a second signal) cancels at once."""
    log.info("draining: no new calls; running ones have %.0fs to finish (a second signal stops at once)", grace_s)
    running.metrics.ready = False
    await running.health.enter_graceful_shutdown()
    running.inference.stopping = True  # new generations: UNAVAILABLE (SERVER_DRAINING), with Retry-After
    drained = asyncio.ensure_future(running.inference.drained())
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait([drained, hurried], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    if not drained.done():
        log.info("cancelling the %d calls still running (their replies keep their text)",
                 running.inference.generating)
    drained.cancel()
    hurried.cancel()
    running.inference.stop_replies()  # chat replies, watched or not: no call's cancel would end them
    await running.server.stop(grace=None)  # cancels what is left; short calls in flight end with it
    try:  # the cancelled handlers run on this loop: let them cancel their sequences and store replies
        await asyncio.wait_for(running.inference.drained(), timeout=10)
    except TimeoutError:
        log.warning("%d calls did not end after their cancel", running.inference.generating)
    log.info("drained")
