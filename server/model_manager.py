"""Loads models from the store on first use and keeps them for reuse.

Loading is single-flight: concurrent first requests for one model wait on the same load.
A model that fails to load is reported with its reason and never stops the others.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .decoder import DeviceUnavailable, OnnxDecoder
from .metrics import Metrics
from .scheduler import Scheduler, SchedulerConfig
from .store import ModelEntry, ModelStore
from .tokenizer import TokenizerBundle


class ModelNotFound(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        listing = ", ".join(known) if known else "none (run `tokenwire pull smollm2-135m`)"
        super().__init__(f"unknown model {name!r}; models in the store: {listing}")
        self.name = name
        self.known = known


class ModelLoadError(RuntimeError):
    """The model is in the store but cannot be loaded; the message says why."""


@dataclass
class LoadedModel:
    entry: ModelEntry
    decoder: OnnxDecoder
    tokenizer: TokenizerBundle
    scheduler: Scheduler
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def context_length(self) -> int:
        return self.entry.context_length or 2048


class ModelManager:
    def __init__(
        self,
        store: ModelStore,
        device: str = "cpu",
        threads: int = 0,
        scheduler_config: SchedulerConfig | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.device = device
        self.threads = threads
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._failed: dict[str, str] = {}
        self.load_count: dict[str, int] = {}

    def resolve(self, name: str) -> ModelEntry:
        """The store entry for an id or alias ("" = default); raises ModelNotFound."""
        entries = self.store.scan()
        model_id = self.store.resolve(name)
        for entry in entries:
            if entry.id == model_id:
                return entry
        raise ModelNotFound(name or "(default)", [e.id for e in entries])

    def state(self, model_id: str) -> tuple[str, str]:
        """(state, error) with state one of available, loading, loaded, failed."""
        with self._lock:
            if model_id in self._loaded:
                return "loaded", ""
            if model_id in self._loading:
                return "loading", ""
            if model_id in self._failed:
                return "failed", self._failed[model_id]
        return "available", ""

    def get(self, name: str) -> LoadedModel:
        """Returns the loaded model, loading it first if needed (blocking; call off the event loop)."""
        entry = self.resolve(name)
        if entry.error:
            raise ModelLoadError(f"model {entry.id} is broken: {entry.error}")
        while True:
            with self._lock:
                model = self._loaded.get(entry.id)
                if model is not None:
                    model.last_used = time.time()
                    return model
                waiter = self._loading.get(entry.id)
                if waiter is None:
                    done = threading.Event()
                    self._loading[entry.id] = done
                    break
            waiter.wait()
            with self._lock:
                if entry.id in self._failed and entry.id not in self._loaded:
                    raise ModelLoadError(self._failed[entry.id])
        try:
            model = self._load(entry)
        except Exception as exc:
            message = f"model {entry.id} failed to load: {exc}"
            with self._lock:
                self._failed[entry.id] = message
                del self._loading[entry.id]
            done.set()
            if isinstance(exc, DeviceUnavailable):
                raise
            raise ModelLoadError(message) from exc
        with self._lock:
            self._loaded[entry.id] = model
            self._failed.pop(entry.id, None)
            del self._loading[entry.id]
        done.set()
        return model

    def _load(self, entry: ModelEntry) -> LoadedModel:
        started = time.perf_counter()
        path = Path(entry.path)
        decoder = OnnxDecoder(path / "model.onnx", device=self.device, threads=self.threads)
        tokenizer = TokenizerBundle(path)
        scheduler = Scheduler(decoder, self.scheduler_config, name=entry.id, metrics=self.metrics)
        self.load_count[entry.id] = self.load_count.get(entry.id, 0) + 1
        seconds = time.perf_counter() - started
        self.metrics.model_loaded(entry.id, seconds)
        return LoadedModel(entry, decoder, tokenizer, scheduler, seconds)

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._loaded)
