"""The disk tier behind the prefix cache: a chat's KV outlives the server.

When a finished chat turn's KV goes to the prefix cache, the scheduler also hands it to
`KVDiskStore.put`, which queues it for the tier's one writer thread and returns at once (a full
queue drops the write: the scheduler thread never waits for a disk; with the memory cache off,
`--prefix-cache-bytes 0`, nothing is written either). The next turn of that chat, when its
prompt misses the memory cache (after a restart, or an eviction), asks `KVDiskStore.lookup`:
the chat's newest file, if it is this model build's, this owner's and its tokens start the
prompt, is read back (one read, one digest) and only the rest is prefilled. That read is on the
scheduler thread (about 40-100 ms for 1,600 positions of the default model, 38 MB, against
seconds to recompute them), so it holds up the running streams' next step once per restored turn.

    <root>/<model>/<chat>/<sha256(scope, tokens)>.kv       (folders 0700, files 0600; kv_file.py)

* Keyed by model id plus `graph_fingerprint` (a rebuilt graph, other kernels, another KV dtype
  or onnxruntime: the old files are stale, ignored), chat id, and a hash of the owner's scope and
  the tokens. A file of another scope is never read for this one (the memory cache's rule).
* Only a chat's newest file matters (its next turn extends its last prefix): writing one removes
  the chat's older files of that model.
* A budget (bytes) over the whole folder, evicted least recently used first; use is the file's
  mtime (touched on each read), so the order survives restarts. The index is built by scanning
  the folder at start (leftover temporary files of a crash are removed then).
* Corrupt files (short, digest mismatch) are deleted when found; stale ones are ignored (and go
  when their chat writes again, or by the budget).
* `delete_chat` removes a chat's files under every model and keeps that chat from being written
  again by a turn still in flight or queued.
* `close` (server shutdown) lets the queue drain within a time limit, so what finished is on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tokenwire.server.metrics import Metrics
from tokenwire.server.native import loader as native_kernels

from .batch_engine import BatchEngine, KVCache
from .kv_file import (
    TEMP_MARK,
    CorruptKVFile,
    KVHeader,
    OpenedKVFile,
    StaleKVFile,
    read_arrays,
    read_header,
    write_kv_file,
)
from .prefix_cache import _common_prefix

log = logging.getLogger("tokenwire.kv_disk")

SUFFIX = ".kv"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_DELETED_CHATS = 100_000  # chat ids remembered as deleted (ids are never reused; this only bounds memory)


def folder_name(name: str) -> str:
    """A model id or chat id as one path component: itself when harmless (':' as '_'), else a hash."""
    plain = name.replace(":", "_")
    return plain if _SAFE_NAME.fullmatch(plain) else hashlib.sha256(name.encode()).hexdigest()[:32]


def graph_fingerprint(model_dir: Path, engine: BatchEngine) -> str:
    """What the KV of a model depends on beyond its id: its manifest, the graph files (size and
    mtime), the engine kind, kernels, KV dtype and device, the native library build and onnxruntime."""
    h = hashlib.sha256()
    manifest = model_dir / "tokenwire.json"
    h.update(manifest.read_bytes() if manifest.is_file() else b"")
    for path in sorted(model_dir.glob("*.onnx*")):
        stat = path.stat()
        h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    kernels = getattr(engine, "kernels", "")
    native = native_kernels.library() if kernels == "native" else None
    h.update(repr((type(engine).__name__, kernels, str(getattr(engine, "dtype", "")), getattr(engine, "device", ""),
                   str(native.path) if native else "", native.isa if native else "", ort.__version__)).encode())
    return h.hexdigest()[:32]


@dataclass
class KVDiskStats:
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    writes: int = 0
    written_bytes: int = 0
    dropped: int = 0  # writes given up: the queue was full
    failed: int = 0  # writes that raised (disk full, permissions)
    corrupt: int = 0  # files found damaged (and deleted)
    stale: int = 0  # files of another build, format or owner passed over
    evictions: int = 0
    files: int = 0
    bytes: int = 0


@dataclass
class _Write:
    store: KVDiskStore
    scope: str
    chat: str
    tokens: tuple[int, ...]
    kv: KVCache
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(a.nbytes for a in self.kv)

    @property
    def key(self) -> tuple[str, str]:
        return self.store.folder.name, self.chat


class KVDiskTier:
    """The process's KV folder: its budget, its index and its writer thread (shared by every model)."""

    def __init__(self, root: Path, budget_bytes: int, metrics: Metrics | None = None, queue_size: int = 8,
                 queue_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.metrics = metrics or Metrics()
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes  # KV held by queued writes (beyond it a write is dropped)
        self.stats = KVDiskStats()
        self._lock = threading.Lock()  # the index, the deleted set, renames and deletions
        self._index: OrderedDict[Path, int] = OrderedDict()  # file -> size, least recently used first
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()  # the queue
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0
        self._writing = False
        self._closed = False
        _private_dir(self.root)
        self._scan()
        self._thread = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._thread.start()

    def for_model(self, model_id: str, fingerprint: str, seq_axis: int = 2, min_match: int = 8) -> KVDiskStore:
        return KVDiskStore(self, model_id, fingerprint, seq_axis, min_match)

    # ---- the index -------------------------------------------------------------------------------

    def _scan(self) -> None:
        found = []
        for path in self.root.glob(f"*/*/*{SUFFIX}*"):
            try:
                if TEMP_MARK in path.name:
                    path.unlink()  # a write a crash interrupted
                elif path.name.endswith(SUFFIX):
                    stat = path.stat()
                    found.append((stat.st_mtime_ns, path, stat.st_size))
            except OSError:
                continue
        with self._lock:
            for _, path, size in sorted(found):
                self._index[path] = size
            self._evict_locked()
            self._report_locked()

    def _add_locked(self, path: Path, size: int) -> None:
        self._index.pop(path, None)
        self._index[path] = size

    def _remove_locked(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        self._index.pop(path, None)

    def _evict_locked(self, keep: Path | None = None) -> None:
        total = sum(self._index.values())
        for path in list(self._index):
            if total <= self.budget_bytes:
                break
            if path == keep:
                continue
            total -= self._index[path]
            self._remove_locked(path)
            self.stats.evictions += 1

    def _report_locked(self) -> None:
        self.stats.files, self.stats.bytes = len(self._index), sum(self._index.values())
        self.metrics.kv_disk_state(self.stats.files, self.stats.bytes, self.stats.evictions)

    def touch(self, path: Path, size: int) -> None:
        """A file was read: it is now the most recently used (in the index and its mtime)."""
        with self._lock:
            if not path.exists():
                return
            try:
                os.utime(path)
            except OSError:
                pass
            self._add_locked(path, size)
            self._report_locked()

    def discard(self, path: Path) -> None:
        with self._lock:
            self._remove_locked(path)
            self._report_locked()

    # ---- chats -----------------------------------------------------------------------------------

    def delete_chat(self, chat_id: str) -> int:
        """Removes the chat's files under every model (and any write of it still queued or in
        flight); returns how many files went."""
        name = folder_name(chat_id)
        with self._cond:
            for job in [j for j in self._queue if j.chat == chat_id]:
                self._queue.remove(job)
                self._queued_bytes -= job.nbytes
        removed = 0
        with self._lock:
            self._deleted[chat_id] = None
            while len(self._deleted) > MAX_DELETED_CHATS:
                self._deleted.popitem(last=False)
            for folder in self.root.glob(f"*/{name}"):
                for path in folder.iterdir():
                    self._remove_locked(path)
                    removed += 1
                try:
                    folder.rmdir()
                except OSError:
                    pass
            self._report_locked()
        return removed

    def is_deleted(self, chat_id: str) -> bool:
        with self._lock:
            return chat_id in self._deleted

    # ---- the writer --------------------------------------------------------------------------------

    def enqueue(self, job: _Write) -> bool:
        """Queues a write without waiting; a newer write of the same chat replaces a queued one.
        False when it was dropped (the queue is full, the tier closed, or the chat deleted)."""
        if job.nbytes > self.budget_bytes or self.is_deleted(job.chat):
            return False
        with self._cond:
            if self._closed:
                return False
            for i, queued in enumerate(self._queue):
                if queued.key == job.key:
                    self._queued_bytes += job.nbytes - queued.nbytes
                    self._queue[i] = job
                    return True
            if len(self._queue) >= self.queue_size or self._queued_bytes + job.nbytes > self.queue_bytes:
                self.stats.dropped += 1
                self.metrics.kv_disk_write(job.store.model_id, "dropped", 0)
                return False
            self._queue.append(job)
            self._queued_bytes += job.nbytes
            self._cond.notify_all()
        return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._queued_bytes -= job.nbytes
                self._writing = True
            try:
                self._write(job)
            except Exception as exc:  # a full disk, a folder removed: the turn is just not kept
                if self.is_deleted(job.chat):  # its folder went with the chat while it was written
                    continue
                self.stats.failed += 1
                self.metrics.kv_disk_write(job.store.model_id, "failed", 0)
                log.warning("could not write the KV of chat %s: %s", job.chat, exc)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def _write(self, job: _Write) -> None:
        store = job.store
        if self.is_deleted(job.chat):
            return
        folder = store.chat_folder(job.chat)
        _private_dir(store.folder)
        _private_dir(folder)
        path = folder / (hashlib.sha256(repr((job.scope, job.tokens)).encode()).hexdigest()[:40] + SUFFIX)
        header = KVHeader(store.model_id, store.fingerprint, job.scope, job.chat, job.tokens,
                          job.kv[0].dtype.str, tuple(a.shape for a in job.kv))
        committed = False

        def commit(temp: Path, final: Path) -> None:
            nonlocal committed
            with self._lock:
                if job.chat in self._deleted:  # deleted while it was being written
                    return
                os.replace(temp, final)
                committed = True
                for older in folder.iterdir():  # only the newest prefix of a chat matters
                    if older != final and older.name.endswith(SUFFIX):
                        self._remove_locked(older)

        size = write_kv_file(path, header, job.kv, commit)
        if not committed:
            return
        with self._lock:
            self._add_locked(path, size)
            self._evict_locked(keep=path)
            self.stats.writes += 1
            self.stats.written_bytes += size
            self._report_locked()
        self.metrics.kv_disk_write(store.model_id, "written", size)

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until every queued write is done (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Server shutdown: writes what is queued within `timeout`, then stops taking writes."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if not flushed:
            log.warning("KV disk tier: %d writes not done within %.0fs of shutdown", left, timeout)
        self._thread.join(timeout=1)
        return flushed


class KVDiskStore:
    """One loaded model's view of the tier: its folder, its fingerprint, its lookups."""

    def __init__(self, tier: KVDiskTier, model_id: str, fingerprint: str, seq_axis: int = 2,
                 min_match: int = 8) -> None:
        self.tier = tier
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.seq_axis = seq_axis
        self.min_match = min_match
        self.folder = tier.root / folder_name(model_id)

    def chat_folder(self, chat: str) -> Path:
        return self.folder / folder_name(chat)

    def put(self, scope: str, chat: str, tokens: list[int], kv: KVCache) -> bool:
        """Queues a finished turn's KV (`tokens` are what it is of) for writing; never waits."""
        if not chat or len(tokens) < self.min_match:
            return False
        return self.tier.enqueue(_Write(self, scope, chat, tuple(tokens), kv))

    def lookup(self, scope: str, chat: str, prompt: list[int], better_than: int = 0) -> tuple[int, KVCache | None]:
        """The KV of the longest prefix of `prompt` the chat's files hold in `scope`, if longer than
        `better_than` (what the memory cache gave) and at least min_match, leaving >= 1 token to
        prefill: (length, KV) or (0, None). A hit, or a miss when the memory cache missed too, is
        counted (stats and metrics)."""
        started = time.perf_counter()
        n, kv = self._find(scope, chat, prompt, better_than)
        stats = self.tier.stats
        if kv is not None:
            stats.hits += 1
            stats.reused_tokens += n
            self.tier.metrics.kv_disk(self.model_id, True, n, time.perf_counter() - started)
        elif not better_than:
            stats.misses += 1
            self.tier.metrics.kv_disk(self.model_id, False, 0, time.perf_counter() - started)
        return (n, kv) if kv is not None else (0, None)

    def _find(self, scope: str, chat: str, prompt: list[int], better_than: int) -> tuple[int, KVCache | None]:
        folder = self.chat_folder(chat)
        try:
            paths = [(p.stat().st_mtime_ns, p) for p in folder.iterdir() if p.name.endswith(SUFFIX)]
        except OSError:  # no file of this chat
            return 0, None
        limit = len(prompt) - 1
        for _, path in sorted(paths, reverse=True):
            opened = self._open(path, scope, chat)
            if opened is None:
                continue
            n = _common_prefix(opened.header.tokens, prompt, limit)
            if n < self.min_match or n <= better_than:
                continue
            try:
                arrays = read_arrays(opened)
            except CorruptKVFile as exc:
                self._corrupt(path, exc)
                continue
            except OSError:
                continue
            self.tier.touch(path, opened.size)
            if n < len(opened.header.tokens):
                arrays = [np.ascontiguousarray(np.take(a, np.arange(n), axis=self.seq_axis)) for a in arrays]
            return n, arrays
        return 0, None

    def _open(self, path: Path, scope: str, chat: str) -> OpenedKVFile | None:
        """The file's header when it is this model build's, this owner's and this chat's, else None."""
        try:
            opened = read_header(path)
        except CorruptKVFile as exc:
            self._corrupt(path, exc)
            return None
        except StaleKVFile:
            self.tier.stats.stale += 1
            return None
        except OSError:  # removed meanwhile
            return None
        h = opened.header
        if (h.model, h.fingerprint, h.chat) != (self.model_id, self.fingerprint, chat):
            self.tier.stats.stale += 1
            return None
        if h.scope != scope:  # another owner's: never read, never touched
            return None
        return opened

    def _corrupt(self, path: Path, why: Exception) -> None:
        log.warning("KV file %s is damaged (%s): deleted", path, why)
        self.tier.stats.corrupt += 1
        self.tier.discard(path)


def _private_dir(path: Path) -> None:
    """Makes the folder (mode 0700) when it is missing; an existing one is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
