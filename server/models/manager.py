"""Loads models from the store on use, keeps them within limits, and unloads them when idle.

* Loading is single-flight: concurrent first requests for one model wait on the same load.
  Loads of different models run one at a time (so the memory each adds can be measured).
* Every request holds a lease on its model (`acquire` ... `release`). An unload waits for
  the leases to end and the scheduler to go idle, so running streams always finish first.
  The server's requests take leases with `acquire_async`: a load runs on the manager's own
  thread pool while the request's task awaits it, and a request for a model being unloaded is
  refused at once (ModelUnloading: retry shortly) rather than parking a thread until the
  unload ends; tools calling `acquire` wait for the unload and load the model again.
* Limits: at most `max_loaded` models and `memory_budget_bytes` of memory. When one more
  would pass either, the least recently used idle model is unloaded first; when every
  loaded model is busy the load waits up to `room_wait_s`, then fails with ModelBusy.
* Keep-alive: when its last lease ends a model expires after the request's keep-alive (or
  the server default); a reaper thread unloads expired models, and models whose folder
  was removed from the store.
* A model that fails to load is remembered with its reason (until its files change) and
  never stops the others.

Memory of a loaded model = the growth of the process's resident set measured while it
loaded (at least the size of its weight files) + the KV cache it holds now. Before a model
is first loaded, its need is estimated as LOAD_OVERHEAD x its weight files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tokenwire.server.engine.embedder import Embedder
from tokenwire.server.engine.graph import open_engine
from tokenwire.server.engine.image_text import ImageReader
from tokenwire.server.engine.kv_disk import KVDiskTier, graph_fingerprint
from tokenwire.server.engine.scheduler import Scheduler, SchedulerConfig
from tokenwire.server.engine.session import DeviceUnavailable
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.engine.transcriber import Transcriber
from tokenwire.server.metrics import Metrics
from tokenwire.server.settings import parse_bytes, parse_duration, setting

from . import process_memory
from .store import ModelEntry, ModelStore, folder_size, model_weight_bytes

log = logging.getLogger("tokenwire.models")

# Resident memory over weight-file size seen at load (measured on SmolLM2-135M: int4 1.3x,
# fp32 1.4-1.8x: MLAS prepacks fp32 weights): the estimate used before a model's first load.
LOAD_OVERHEAD = 1.5

# The longest keep-alive honoured; longer ones (and inf) are clamped to it. Negative: forever.
MAX_KEEP_ALIVE_S = 365 * 24 * 3600.0

# (stage, message); stages: "waiting", "unloading", "loading", "ready".
Progress = Callable[[str, str], None]


def _quiet(stage: str, message: str) -> None:
    pass


@dataclass(frozen=True)
class DeleteResult:
    model_id: str
    aliases: list[str]
    freed_bytes: int


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        listing = ", ".join(known) if known else "none (run `tokenwire pull smollm2-135m`)"
        super().__init__(f"unknown model {name!r}; models in the store: {listing}")
        self.name = name
        self.known = known


class ModelLoadError(RuntimeError):
    """The model is in the store but cannot be loaded; the message says why."""


class ModelTooLarge(ModelLoadError):
    """The model alone needs more memory than the budget allows."""


class ModelBusy(RuntimeError):
    """No room to load a model: every loaded model is in use. Retry shortly."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelUnloading(ModelBusy):
    """The model is being unloaded (its last streams are finishing): retry in a moment, when it
    loads again. A server request gets this at once instead of parking a thread until the unload ends."""


# How long a request for a model being unloaded is told to wait before it retries.
UNLOADING_RETRY_S = 1


@dataclass
class ModelLimits:
    max_loaded: int = setting(3, "models loaded at once, 0 = no limit; one more unloads the least recently "
                              "used idle one", flag="--max-loaded-models", env="MAX_LOADED_MODELS")
    memory_budget_bytes: int = setting(0, "memory for loaded models (bytes, or 512M, 8G), 0 = no budget; "
                                       "evicts like --max-loaded-models", parse=parse_bytes)
    keep_alive_s: float = setting(300.0, "how long an idle model stays loaded: seconds, or 5m, 1h; negative = "
                                  "until unloaded (a request's keep_alive_s overrides it)", flag="--keep-alive",
                                  env="KEEP_ALIVE", parse=parse_duration)
    room_wait_s: float = 120.0  # how long a load waits for a busy model to become idle


@dataclass
class LoadedModel:
    entry: ModelEntry
    tokenizer: TokenizerBundle | None  # None for an embedding or speech model (they tokenize themselves)
    # A decoder's scheduler, an embedding model's encoder, or a speech model's transcriber (its fair queue).
    scheduler: Scheduler | Embedder | Transcriber | ImageReader
    load_seconds: float
    resident_bytes: int = 0  # measured at load, weights included
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    leases: int = 0
    expires_at: float | None = None  # set when idle; None: in use, or kept until unloaded

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def context_length(self) -> int:
        return self.entry.context_length

    @property
    def kv_bytes(self) -> int:
        return kv_bytes_of(self.scheduler)

    @property
    def memory_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes

    @property
    def idle(self) -> bool:
        return self.leases == 0 and not self.scheduler.busy


def kv_bytes_of(scheduler: Scheduler | Embedder | Transcriber | ImageReader) -> int:
    """KV held by a scheduler: its running batch and its prefix cache (an encoder, a transcriber or
    an image reader holds none that tokenwire counts)."""
    if isinstance(scheduler, Embedder | Transcriber | ImageReader):
        return 0
    return int(scheduler.engine.kv_bytes + scheduler.prefix_cache.stats.bytes)


@dataclass
class ModelStatus:
    """What a listing shows about one model (transport-neutral)."""

    state: str  # available, loading, loaded, failed
    error: str = ""
    memory_bytes: int = 0
    kv_cache_bytes: int = 0
    last_used: float = 0.0  # Unix time; 0: never since start
    load_seconds: float = 0.0
    load_count: int = 0
    expires_at: float | None = None
    active_requests: int = 0


@dataclass
class UnloadResult:
    model_id: str
    was_loaded: bool
    drain_seconds: float = 0.0


@dataclass
class _Load:
    """One load in flight: threads wait on `done`, event-loop tasks on `future` (both set together)."""

    done: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    error: BaseException | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        self.future.set_result(None)


@dataclass
class _History:
    load_count: int = 0
    load_seconds: float = 0.0
    last_used: float = 0.0
    resident_bytes: int = 0
    fingerprint: tuple = ()


class ModelManager:
    def __init__(
        self,
        store: ModelStore,
        device: str = "cpu",
        threads: int = 0,
        scheduler_config: SchedulerConfig | None = None,
        kernels: str = "auto",
        limits: ModelLimits | None = None,
        metrics: Metrics | None = None,
        kv_disk: KVDiskTier | None = None,
    ) -> None:
        self.store = store
        self.kv_disk = kv_disk  # where chats' KV outlives the server (engine/kv_disk.py); None: nowhere
        self.metrics = metrics or Metrics()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.device = device
        self.threads = threads
        self.kernels = kernels
        self.limits = limits or ModelLimits()
        self.rss = process_memory.rss_bytes  # replaceable in tests
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, _Load] = {}
        self._reserved: dict[str, int] = {}
        self._unloading: dict[str, LoadedModel] = {}
        self._failed: dict[str, tuple[str, tuple]] = {}
        self._history: dict[str, _History] = {}
        self._closed = False
        # Loads, preloads and unloads wait (for a load lock, for room, for streams to drain): they
        # run here, never on the event loop's shared executor, so waiting on one model cannot
        # starve requests for the others.
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="model-work")
        self._reaper = threading.Thread(target=self._reap_loop, name="model-reaper", daemon=True)
        self._reaper.start()

    # ---- lookup --------------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry:
        """The store entry a name refers to (ModelStore.find's rule; "" = default); raises
        ModelNotFound. Scans the store folder: call it off the event loop."""
        entries = self.store.scan()
        entry = self.store.find(name, entries)
        if entry is None:
            raise ModelNotFound(name or "(default)", [e.id for e in entries])
        return entry

    @property
    def load_count(self) -> dict[str, int]:
        with self._cond:
            return {k: h.load_count for k, h in self._history.items()}

    def loaded_ids(self) -> list[str]:
        with self._cond:
            return list(self._loaded)

    def state(self, model_id: str) -> tuple[str, str]:
        status = self.status(model_id)
        return status.state, status.error

    def status(self, model_id: str, entry: ModelEntry | None = None) -> ModelStatus:
        with self._cond:
            history = self._history.get(model_id, _History())
            common = {"last_used": history.last_used, "load_seconds": history.load_seconds,
                      "load_count": history.load_count}
            model = self._loaded.get(model_id) or self._unloading.get(model_id)
            if model is not None:
                return ModelStatus("loaded", memory_bytes=model.memory_bytes, kv_cache_bytes=model.kv_bytes,
                                   expires_at=model.expires_at, active_requests=model.leases, **common)
            if model_id in self._loading:
                return ModelStatus("loading", **common)
            failed = self._failed.get(model_id)
        if failed is not None:
            message, fingerprint = failed
            if entry is None or fingerprint == _fingerprint(entry.path):
                return ModelStatus("failed", error=message, **common)
        return ModelStatus("available", **common)

    def memory_in_use(self) -> int:
        with self._cond:
            return sum(m.memory_bytes for m in (*self._loaded.values(), *self._unloading.values()))

    # ---- leases --------------------------------------------------------------------------------

    def get(self, name: str) -> LoadedModel:
        """A loaded model with no lease kept (for tools and tests that own the manager)."""
        model = self.acquire(name)
        self.release(model)
        return model

    def acquire(self, model: str | ModelEntry, progress: Progress | None = None) -> LoadedModel:
        """Returns the model (a name, or an entry already resolved), loaded, with a lease held
        until `release` (blocking: call off the event loop). Raises ModelNotFound, ModelLoadError,
        ModelBusy or DeviceUnavailable."""
        entry = model if isinstance(model, ModelEntry) else self.resolve(model)
        say = progress or _quiet
        _check_not_broken(entry)
        told_waiting = False
        while True:
            with self._cond:
                if entry.id in self._unloading:
                    say("waiting", f"waiting for {entry.id} to finish unloading")
                    self._cond.wait_for(lambda: entry.id not in self._unloading)
                    continue
                model, pending, owner = self._claim(entry)
                if model is not None:
                    return model
            if owner:
                return self._load_owned(entry, pending, say)
            if not told_waiting:
                say("waiting", f"{entry.id} is being loaded by another request")
                told_waiting = True
            pending.done.wait()
            if pending.error is not None:
                raise _again(pending.error)

    async def acquire_async(self, entry: ModelEntry) -> LoadedModel:
        """`acquire` for the event loop: a loaded model at once; a load runs on `pool` while the
        task awaits it (as do tasks that want the same model meanwhile: no thread waits for
        them); a model being unloaded raises ModelUnloading (retry shortly) instead of waiting.
        If the task is cancelled while its model loads, the lease the load takes is handed back."""
        _check_not_broken(entry)
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if entry.id in self._unloading:
                    raise ModelUnloading(f"model {entry.id} is being unloaded (its running streams are "
                                         "finishing); retry in a moment and it loads again",
                                         UNLOADING_RETRY_S)
                model, pending, owner = self._claim(entry)
                if model is not None:
                    return model
            if owner:
                job = loop.run_in_executor(self.pool, self._load_owned, entry, pending, _quiet)
                try:
                    return await asyncio.shield(job)
                except asyncio.CancelledError:
                    job.add_done_callback(self._give_back)
                    raise
            await asyncio.shield(asyncio.wrap_future(pending.future))  # shield: others wait on it too
            if pending.error is not None:
                raise _again(pending.error)

    def _claim(self, entry: ModelEntry) -> tuple[LoadedModel | None, _Load | None, bool]:
        """Under the lock, a model not being unloaded: (the model, leased) when it is loaded; else
        (None, its load in flight, whether this caller owns that load and must run it)."""
        model = self._loaded.get(entry.id)
        if model is not None:
            self._lease(model)
            return model, None, False
        pending = self._loading.get(entry.id)
        if pending is None:
            pending = self._loading[entry.id] = _Load()
            return None, pending, True
        return None, pending, False

    def _give_back(self, done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            self.release(done.result())

    def release(self, model: LoadedModel, keep_alive_s: float | None = None) -> None:
        """Ends a lease. When it was the last, the model expires after `keep_alive_s` seconds
        (None: the server default; 0: at once; negative: never)."""
        keep = self.limits.keep_alive_s if keep_alive_s is None else keep_alive_s
        keep = min(keep, MAX_KEEP_ALIVE_S)  # a huge keep-alive (1e17, inf) is "a year", not an overflow
        with self._cond:
            model.leases = max(0, model.leases - 1)
            now = time.time()
            model.last_used = now
            self._history.setdefault(model.id, _History()).last_used = now
            if model.leases == 0:
                model.expires_at = None if keep < 0 else now + keep
            self._cond.notify_all()

    def preload(self, name: str | ModelEntry, keep_alive_s: float | None = None,
                progress: Progress | None = None) -> str:
        """Loads a model (if needed) and leaves it idle with its keep-alive; returns its id."""
        model = self.acquire(name, progress)
        self.release(model, keep_alive_s)
        (progress or _quiet)("ready", f"{model.id} is ready")
        return model.id

    def _lease(self, model: LoadedModel) -> None:
        model.leases += 1
        model.expires_at = None
        model.last_used = time.time()
        self._history.setdefault(model.id, _History()).last_used = model.last_used

    # ---- loading -------------------------------------------------------------------------------

    def _load_owned(self, entry: ModelEntry, pending: _Load, say: Progress) -> LoadedModel:
        try:
            self._make_room(entry, say)
            with self._load_lock:
                model = self._load(entry, say)
        except BaseException as exc:
            error = exc
            if not isinstance(exc, ModelLoadError | ModelBusy | DeviceUnavailable):
                error = ModelLoadError(f"model {entry.id} failed to load: {exc}")
            with self._cond:
                self._reserved.pop(entry.id, None)
                del self._loading[entry.id]
                if isinstance(error, ModelLoadError):
                    self._failed[entry.id] = (str(error), _fingerprint(entry.path))
                self._cond.notify_all()
            pending.finish(error)
            log.warning("%s", error)
            if error is exc:
                raise
            raise error from exc
        with self._cond:
            self._reserved.pop(entry.id, None)
            del self._loading[entry.id]
            self._failed.pop(entry.id, None)
            history = self._history.setdefault(entry.id, _History())
            history.load_count += 1
            history.load_seconds = model.load_seconds
            history.resident_bytes = model.resident_bytes
            history.fingerprint = _fingerprint(entry.path)
            self._loaded[entry.id] = model
            self._lease(model)
            count = history.load_count
            self._cond.notify_all()
        pending.finish()
        log.info("loaded model %s in %.2fs (load #%d, resident %.1f MB)", entry.id, model.load_seconds,
                 count, model.resident_bytes / 1e6)
        self._trim(keep=entry.id)
        return model

    def _load(self, entry: ModelEntry, say: Progress) -> LoadedModel:
        path = Path(entry.path)
        weights = model_weight_bytes(entry)
        started = time.perf_counter()
        process_memory.release_free_memory()  # so the growth below is what stays, not freed transients
        before = self.rss()
        say("loading", f"reading {entry.id}'s graph ({weights / 1e6:.1f} MB) into onnxruntime")
        if entry.kind == "embedding":
            embedder = Embedder(path, device=self.device, threads=self.threads)
            process_memory.release_free_memory()
            resident = max(self.rss() - before, weights)
            seconds = time.perf_counter() - started
            self.metrics.model_loaded(entry.id, seconds)
            return LoadedModel(entry, None, embedder, seconds, resident)
        if entry.kind == "speech":
            transcriber = Transcriber(path, device=self.device, threads=self.threads)
            resident = max(self.rss() - before, weights)
            seconds = time.perf_counter() - started
            self.metrics.model_loaded(entry.id, seconds)
            return LoadedModel(entry, None, transcriber, seconds, resident)
        if entry.kind == "ocr":
            try:
                reader = ImageReader(path, threads=self.threads).load()
            except ImportError as exc:
                raise ModelLoadError(f"model {entry.id} reads images with rapidocr, which is not installed "
                                     "(pip install 'tokenwire[vision]')") from exc
            process_memory.release_free_memory()
            resident = max(self.rss() - before, weights)
            seconds = time.perf_counter() - started
            self.metrics.model_loaded(entry.id, seconds)
            return LoadedModel(entry, None, reader, seconds, resident)
        if entry.kind not in ("generate", ""):
            raise ModelLoadError(f"model {entry.id} is of kind {entry.kind!r}, which this server cannot load")
        engine, kernels = open_engine(path, device=self.device, threads=self.threads,
                                      context_length=entry.context_length, kernels=self.kernels, model_id=entry.id)
        say("loading", kernels)
        say("loading", "reading the tokenizer and chat template")
        tokenizer = TokenizerBundle(path)
        kv_disk = self.kv_disk.for_model(entry.id, graph_fingerprint(path, engine), engine.seq_axis) \
            if self.kv_disk is not None else None
        scheduler = Scheduler(engine, self.scheduler_config, name=entry.id, metrics=self.metrics, tokenizer=tokenizer,
                              kv_room=lambda: self.kv_room(entry.id), kv_disk=kv_disk)
        process_memory.release_free_memory()  # the graph's protobuf copy is freed by now
        resident = max(self.rss() - before, weights)
        seconds = time.perf_counter() - started
        self.metrics.model_loaded(entry.id, seconds)
        return LoadedModel(entry, tokenizer, scheduler, seconds, resident)

    def kv_room(self, model_id: str) -> int | None:
        """What the memory budget leaves for one model's KV: the budget less every loaded model's
        weights and the other models' KV (None without a budget). Asked by that model's scheduler
        before it admits a sequence, so KV is counted against --memory-budget-bytes as weights are."""
        budget = self.limits.memory_budget_bytes
        if not budget:
            return None
        used = 0
        for model in list(self._loaded.values()):
            used += model.resident_bytes + (model.kv_bytes if model.id != model_id else 0)
        return budget - used

    def estimate_bytes(self, entry: ModelEntry) -> int:
        """Memory a load of this model is expected to add: measured at its last load, else estimated."""
        with self._cond:
            history = self._history.get(entry.id)
        if history and history.resident_bytes and history.fingerprint == _fingerprint(entry.path):
            return history.resident_bytes
        return int(model_weight_bytes(entry) * LOAD_OVERHEAD)

    def _make_room(self, entry: ModelEntry, say: Progress) -> None:
        """Unloads idle models (least recently used first) until one more fits; reserves its room."""
        need = self.estimate_bytes(entry)
        budget, most = self.limits.memory_budget_bytes, self.limits.max_loaded
        if budget and need > budget:
            raise ModelTooLarge(
                f"model {entry.id} needs about {need / 1e6:.0f} MB, more than the memory budget of "
                f"{budget / 1e6:.0f} MB (--memory-budget-bytes)"
            )
        deadline = time.monotonic() + self.limits.room_wait_s
        told_waiting = False
        with self._cond:
            while True:
                resident = [*self._loaded.values(), *self._unloading.values()]
                count = len(resident) + len(self._reserved)
                used = sum(m.memory_bytes for m in resident) + sum(self._reserved.values())
                why = []
                if most and count + 1 > most:
                    why.append(f"{count} of at most {most} models loaded")
                if budget and used + need > budget:
                    why.append(f"{used / 1e6:.0f} MB in use + {need / 1e6:.0f} MB needed > budget "
                               f"{budget / 1e6:.0f} MB")
                if not why:
                    self._reserved[entry.id] = need
                    return
                victim = min((m for m in self._loaded.values() if m.idle), key=lambda m: m.last_used, default=None)
                if victim is not None:
                    say("unloading", f"unloading {victim.id} (least recently used, idle) to make room: "
                                     + "; ".join(why))
                    self._begin_unload(victim)
                    self._cond.release()
                    try:
                        self._finish_unload(victim, f"to make room for {entry.id}")
                    finally:
                        self._cond.acquire()
                    continue
                if self._unloading:
                    self._cond.wait(0.05)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    busy = ", ".join(self._loaded) or "none"
                    raise ModelBusy(f"no room to load {entry.id}: " + "; ".join(why)
                                    + f", and every loaded model is busy ({busy}); retry shortly")
                if not told_waiting:
                    say("waiting", "waiting for a loaded model to become idle: " + "; ".join(why))
                    told_waiting = True
                self._cond.wait(min(remaining, 0.1))

    def _trim(self, keep: str) -> None:
        """After a load measured more than estimated: unload idle models while over the budget."""
        budget = self.limits.memory_budget_bytes
        while budget:
            with self._cond:
                if sum(m.memory_bytes for m in self._loaded.values()) <= budget:
                    return
                victims = [m for m in self._loaded.values() if m.idle and m.id != keep]
                if not victims:
                    return
                victim = min(victims, key=lambda m: m.last_used)
                self._begin_unload(victim)
            self._finish_unload(victim, "over the memory budget")

    # ---- unloading -----------------------------------------------------------------------------

    def unload(self, name: str) -> UnloadResult:
        """Unloads a model after its running requests finish (blocking)."""
        with self._cond:
            model_id = name if name in self._loaded or name in self._unloading else ""
        if not model_id:
            model_id = self.resolve(name).id
        while True:
            with self._cond:
                pending = self._loading.get(model_id)
                if pending is None:
                    if model_id in self._unloading:
                        self._cond.wait_for(lambda: model_id not in self._unloading)
                        return UnloadResult(model_id, False)
                    model = self._loaded.get(model_id)
                    if model is None:
                        return UnloadResult(model_id, False)
                    self._begin_unload(model)
                    break
            pending.done.wait()  # a load in flight: let it finish, then unload it
        drained = self._finish_unload(model, "asked to")
        return UnloadResult(model_id, True, drained)

    def delete(self, name: str) -> DeleteResult:
        """Unloads a model (as unload does) and removes it from the store with its aliases."""
        entry = self.resolve(name)
        self.unload(entry.id)
        aliases = sorted(a for a in self.store.aliases() if self.store.resolve(a) == entry.id)
        size = folder_size(entry.path)
        self.store.remove(entry.id)
        return DeleteResult(entry.id, aliases, size)

    def _begin_unload(self, model: LoadedModel) -> None:
        """Under the lock: no new request gets this model from now on."""
        del self._loaded[model.id]
        self._unloading[model.id] = model

    def _finish_unload(self, model: LoadedModel, reason: str) -> float:
        """Waits for the model's requests to finish, then stops its scheduler and frees it;
        returns the seconds spent waiting for the requests."""
        started = time.perf_counter()
        with self._cond:
            while not model.idle:
                self._cond.wait(0.05)
            memory = model.memory_bytes
        drained = time.perf_counter() - started
        model.scheduler.stop()
        with self._cond:
            self._unloading.pop(model.id, None)
            self._cond.notify_all()
        # Whoever still holds the LoadedModel (a finished request, a caller) must not keep the
        # session and its caches alive: drop them here, then hand the pages back to the OS.
        model.scheduler = None  # type: ignore[assignment]
        process_memory.release_free_memory()
        log.info("unloaded model %s (%s), about %.1f MB freed", model.id, reason, memory / 1e6)
        return drained

    def _unload_if_idle(self, model: LoadedModel, reason: str, expired: bool = False) -> bool:
        with self._cond:
            if self._loaded.get(model.id) is not model or not model.idle:
                return False
            if expired and (model.expires_at is None or model.expires_at > time.time()):
                return False
            self._begin_unload(model)
        log.info("unloading %s: %s", model.id, reason)
        self._finish_unload(model, reason)
        return True

    def _reap_loop(self) -> None:
        """Unloads models whose keep-alive ran out, and models removed from the store."""
        next_scan = 0.0
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.time()
                due = [m for m in self._loaded.values() if m.expires_at is not None and m.expires_at <= now]
            for model in due:
                self._unload_if_idle(model, "keep-alive expired", expired=True)
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + 2.0
                self._reap_removed()
            with self._cond:
                if self._closed:
                    return
                now = time.time()
                pending = [m.expires_at for m in self._loaded.values() if m.expires_at is not None]
                wait = min([1.0] + [max(0.05, t - now) for t in pending])
                self._cond.wait(wait)

    def _reap_removed(self) -> None:
        with self._cond:
            loaded = list(self._loaded.values())
        if not loaded:
            return
        try:
            present = {e.id for e in self.store.scan()}
        except OSError:
            return
        for model in loaded:
            if model.id not in present:
                self._unload_if_idle(model, "its folder was removed from the store")

    def close(self) -> None:
        """Stops the reaper and every scheduler (server shutdown; does not wait for requests)."""
        with self._cond:
            self._closed = True
            models = list(self._loaded.values())
            self._loaded.clear()
            self._cond.notify_all()
        for model in models:
            model.scheduler.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _check_not_broken(entry: ModelEntry) -> None:
    if entry.error:
        raise ModelLoadError(f"model {entry.id} is broken: {entry.error}")


def _fingerprint(folder: Path) -> tuple:
    """Changes when a model's files change (so a fixed folder is no longer reported failed)."""
    items = []
    for name in ("model.onnx", "tokenwire.json", "config.json", "tokenizer.json"):
        try:
            stat = (Path(folder) / name).stat()
            items.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            items.append((name, -1, 0))
    return tuple(items)


def _again(error: BaseException) -> BaseException:
    """The error of a shared load, raised afresh for each request that waited on it."""
    if isinstance(error, ModelBusy):
        return ModelBusy(str(error), error.retry_after_s)
    try:
        return type(error)(str(error))
    except Exception:
        return ModelLoadError(str(error))
