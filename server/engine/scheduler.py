"""Continuous batching for one loaded model: admission, prefill, one batched decode per step.

One thread per model runs the loop below; onnxruntime releases the GIL while it computes.

* Admission: a bounded queue. `submit` refuses at once (QueueFull) when `queue_size`
  requests already wait. Waiting requests are admitted round-robin across users (so one
  user's flood cannot starve the others), each user limited to `max_streams_per_user`
  running streams, and each waiting request is told its place whenever it changes.
* Prefill: an admitted sequence first reuses the longest cached prefix of its prompt
  (PrefixCache), then prefills the rest alone in chunks of `prefill_chunk` tokens, one chunk
  between decode steps so running streams keep flowing.
* Decode: every running sequence advances one token per batched forward pass (BatchEngine.step).
  Finished, stopped and cancelled sequences leave at once; their KV goes to the prefix cache and,
  for a chat's turn (request.kv_key), to the disk tier (kv_disk.py), which a later turn of that
  chat restores from when the memory cache misses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwire.server.metrics import Metrics
from tokenwire.server.settings import parse_bytes, setting

from .batch_engine import BatchEngine, KVCache, PrefillState
from .kv_disk import KVDiskStore
from .prefix_cache import PrefixCache
from .sequence import Event, FinishedEvent, FinishReason, QueuedEvent, RefusedEvent, Sequence
from .tokenizer import TokenizerBundle

log = logging.getLogger("tokenwire.scheduler")


class SchedulerUnavailable(RuntimeError):
    """The model's scheduler is unloading or stopped after an internal error."""


class KVBudgetExceeded(RuntimeError):
    """A sequence's KV cache cannot fit in what the memory budget leaves, even with nothing else running."""


# What the memory budget leaves for one model's KV (its running sequences and its prefix cache), in
# bytes, asked before each admission; None: no budget. The model manager provides it.
KVRoom = Callable[[], int | None]
# How long other users' requests that fit may pass one whose KV waits for room (then it goes first).
KV_BYPASS_S = 5.0


class QueueFull(RuntimeError):
    def __init__(self, queue_size: int = 0, retry_after_s: int = 1, message: str = "") -> None:
        super().__init__(message or
                         f"the server is busy: {queue_size} requests are already waiting for this model; retry shortly")
        self.retry_after_s = retry_after_s


@dataclass
class SchedulerConfig:
    max_batch: int = setting(16, "sequences decoded together in one batched step, per model",
                             aliases=("--max-running",))
    queue_size: int = setting(32, "requests that may wait per model; one more gets RESOURCE_EXHAUSTED")
    prefill_chunk: int = setting(512, "prompt tokens prefilled per scheduler step (long prompts are split so "
                                 "running streams keep flowing)")
    max_streams_per_user: int = setting(0, "concurrent streams per user, 0 = no limit; extra requests wait "
                                        "their turn")
    max_queued_per_user: int = setting(0, "requests one user may have waiting, 0 = no fixed limit (a full queue "
                                       "still refuses the user who holds most of it, not a newcomer)")
    prefix_cache_bytes: int = setting(512 << 20, "memory for the KV state of finished turns (prefix reuse), "
                                      "bytes or 512M; 0 = off", parse=parse_bytes)
    shared_prefix_file: str = setting(
        "", "a file of system prompts whose KV every user may reuse (with API keys each user's prefix cache is "
        "otherwise private); prompts separated by lines of ---")


def read_shared_prompts(path: str) -> tuple[str, ...]:
    """The prompts of a --shared-prefix-file: blocks separated by lines holding only ---."""
    if not path:
        return ()
    # pragma: the encoding's mutants (None, "UTF-8") read the same on a UTF-8 locale
    with open(path, encoding="utf-8") as f:  # pragma: no mutate
        text = f.read()
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip() == "---":
            blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    blocks.append("\n".join(current))
    return tuple(b.strip("\n") for b in blocks if b.strip())


# The prefix-cache scope of operator-marked shared prompts (no user's scope can be this name:
# theirs are "" or "key-user:<id>").
SHARED_SCOPE = "shared-prompt"


def shared_prefix_ids(prompts: tuple[str, ...], tokenizer: TokenizerBundle | None,
                      min_match: int) -> list[tuple[int, ...]]:
    """The token sequences a prompt starting with one of `prompts` begins with: the prompt as a
    chat's system message (as the model's template renders it) and as raw text; longest first."""
    found: set[tuple[int, ...]] = set()
    # pragma: without a tokenizer every encode fails and is skipped below: `or True` finds nothing too
    for text in prompts if tokenizer is not None else ():  # pragma: no mutate
        for encode in (lambda t=text: tokenizer.encode_chat([{"role": "system", "content": t}],
                                                            add_generation_prompt=False),
                       lambda t=text: tokenizer.encode(t)):
            try:
                ids = tuple(encode())
            except Exception:  # noqa: BLE001 - a template that refuses a lone system message
                continue
            if len(ids) >= min_match:
                found.add(ids)
    return sorted(found, key=len, reverse=True)


class SequenceHandle:
    """A Sequence plus the way back to its asyncio consumer (events cross via call_soon_threadsafe)."""

    def __init__(self, sequence: Sequence, loop: asyncio.AbstractEventLoop, on_finished=None) -> None:
        self.sequence = sequence
        self.user = sequence.request.user
        self._loop = loop
        self._queue: asyncio.Queue[Event | QueuedEvent] = asyncio.Queue()
        self._on_finished = on_finished
        self.position = 0
        # Prefill progress (scheduler thread only). pragma: _prefill_step sets prefilled and shared,
        # and the join sets next_token, before any of them is read; these are declarations.
        self.prefill: PrefillState | None = None
        self.prefilled = 0  # pragma: no mutate
        self.next_token: int | None = None  # pragma: no mutate
        self.shared = 0  # pragma: no mutate  (tokens of its prompt that are an operator-marked shared prefix)
        self.kv_reserved = 0  # KV bytes held for it from admission to its end (its prompt + max_tokens)
        self.kv_blocked_since = 0.0  # when it first waited for KV room (0: never)

    def emit(self, events: list) -> None:
        for event in events:
            if isinstance(event, FinishedEvent) and self._on_finished is not None:
                try:
                    self._on_finished(event)
                except Exception:  # a logging hook must never break the loop
                    log.exception("on_finished hook failed")
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

    def cancel(self) -> None:
        self.sequence.cancelled.set()

    def refuse(self, error: Exception) -> None:
        """Ends a request that never started with `error` (its stream's last event)."""
        self.sequence.cancelled.set()
        self.emit([RefusedEvent(error)])

    async def events(self):
        """Yields QueuedEvents, TokenEvents and finally the FinishedEvent (or a RefusedEvent)."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishedEvent | RefusedEvent):
                return


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_chunks: int = 0
    tokens_generated: int = 0
    batch_size_sum: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        engine: BatchEngine,
        config: SchedulerConfig,
        name: str = "",
        metrics: Metrics | None = None,
        tokenizer: TokenizerBundle | None = None,
        kv_room: KVRoom | None = None,
        kv_disk: KVDiskStore | None = None,
    ) -> None:
        self.engine = engine
        self.kv_disk = kv_disk  # chats' KV on disk, behind the prefix cache (kv_disk.py); None: off
        self.kv_room = kv_room
        self._kv_reserved = 0  # the sum of the running sequences' kv_reserved
        self.metrics = metrics or Metrics()
        self.config = config
        self.name = name
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, seq_axis=self.engine.seq_axis)
        self.metrics.capacity(name, config.max_batch, config.prefix_cache_bytes)
        self.shared_prefixes = shared_prefix_ids(read_shared_prompts(config.shared_prefix_file), tokenizer,
                                                 self.prefix_cache.min_match)
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: OrderedDict[str, deque[SequenceHandle]] = OrderedDict()
        self._n_waiting = 0
        self._running_per_user: dict[str, int] = {}
        self._prefilling: deque[SequenceHandle] = deque()
        self._rows: list[SequenceHandle] = []
        # pragma: both are only tested for truth; None reads as False and "" alike
        self._stop = False  # pragma: no mutate
        self._dead = ""  # pragma: no mutate  (why the loop stopped after an unexpected error; "" while healthy)
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    # ---- called from the event loop ------------------------------------------------------------

    def submit(self, handle: SequenceHandle) -> None:
        """Queues a sequence, or raises QueueFull at once."""
        with self._cond:
            if self._dead:
                raise SchedulerUnavailable(f"model {self.name} stopped after an internal error: {self._dead}")
            if self._stop:
                raise SchedulerUnavailable(f"model {self.name} is unloading; retry")
            mine = len(self._waiting.get(handle.user, ()))
            limit = self.config.max_queued_per_user
            if limit and mine >= limit:
                raise QueueFull(message=f"you already have {mine} requests waiting for model "
                                f"{self.name} (at most {limit} per user); retry when one has started")
            # The next step admits up to `free` waiting requests; the rest count against the queue.
            free = max(0, self.config.max_batch - self.running)
            if self._n_waiting >= self.config.queue_size + free:
                self._make_room(mine)
            self._waiting.setdefault(handle.user, deque()).append(handle)
            self._n_waiting += 1
            self.metrics.queue_length(self.name, self._n_waiting)
            self._cond.notify()

    def _make_room(self, mine: int) -> None:
        """A full queue: the user who holds most of it gives up their newest waiting request for a
        user with fewer (`mine`: the newcomer's waiting requests); when that is the newcomer themself
        (who holds `mine`, no more than mine + 1) or no one holds more, the newcomer is refused. So
        one user's flood cannot keep everyone else out."""
        heaviest = max(self._waiting, key=lambda u: len(self._waiting[u]), default=None)
        if heaviest is None or len(self._waiting[heaviest]) <= mine + 1:
            raise QueueFull(self.config.queue_size)
        queue = self._waiting[heaviest]
        victim = queue.pop()
        if not queue:
            del self._waiting[heaviest]
        self._n_waiting -= 1
        victim.refuse(QueueFull(message=(
            f"the server is busy: the queue of model {self.name} is full and this user holds the most of it "
            f"({len(queue) + 1} requests); retry shortly")))
        self._notify_positions()

    @property
    def waiting(self) -> int:
        return self._n_waiting

    @property
    def running(self) -> int:
        return len(self._rows) + len(self._prefilling)

    @property
    def busy(self) -> bool:
        return bool(self._n_waiting or self._rows or self._prefilling)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)  # pragma: no mutate  (a bound against a hung engine; any bound will do)
        for report in (self.metrics.queue_length, self.metrics.batch_size):
            report(self.name, 0)
        self.metrics.capacity(self.name, 0, 0)
        self.metrics.kv_memory(self.name, 0, 0, 0, 0)
        self.metrics.prefix_cache_state(self.name, 0, 0, self.prefix_cache.stats.evictions)

    # ---- admission (under self._cond) ----------------------------------------------------------

    def _has_free_slot(self, user: str) -> bool:
        """Whether the user may start another stream (the batch's own room is _admit's check)."""
        limit = self.config.max_streams_per_user
        return not limit or self._running_per_user.get(user, 0) < limit

    def _admission_order(self) -> list[SequenceHandle]:
        """Everyone not yet generating, in the order they will start: admitted sequences waiting
        for their prefill (behind the one being prefilled), then the queue, round-robin across users."""
        queues = [list(q) for q in self._waiting.values()]
        order: list[SequenceHandle] = list(self._prefilling)[1:]
        depth = 0
        while len(order) < self._n_waiting + max(len(self._prefilling) - 1, 0):
            for q in queues:
                if depth < len(q):
                    order.append(q[depth])
            depth += 1
        return order

    def _admit(self) -> None:
        # pragma: only its truth is read, and with it True the positions are sent once more, which
        # sends nothing (a handle is told only a place that changed)
        admitted = False  # pragma: no mutate
        while self._n_waiting and self.running < self.config.max_batch:
            picked, need, fits = self._pick()
            if picked is None:
                break
            queue = self._waiting.pop(picked)
            handle = queue.popleft()
            if queue:
                self._waiting[picked] = queue  # back of the rotation
            self._n_waiting -= 1
            if not fits:
                handle.refuse(self._kv_refusal(handle, need))
                admitted = True  # pragma: no mutate  (positions behind it moved)
                continue
            handle.kv_reserved = need
            self._kv_reserved += need
            self._running_per_user[picked] = self._running_per_user.get(picked, 0) + 1
            handle.sequence.start()
            self._prefilling.append(handle)
            admitted = True
        if admitted or any(h.position == 0 for q in self._waiting.values() for h in q):
            self._notify_positions()
        self.metrics.queue_length(self.name, self._n_waiting)

    def _pick(self) -> tuple[str | None, int, bool]:
        """The user whose next request starts now (round-robin over users with a free stream slot),
        its KV need, and whether that fits (False: refuse it, it never could). A request whose KV
        does not fit while others run waits first in line; other users' requests that fit may pass
        it for KV_BYPASS_S, then admission stops until running sequences have made its room."""
        now = time.monotonic()
        for user in list(self._waiting):
            if not self._has_free_slot(user):
                continue
            head = self._waiting[user][0]
            need = self._kv_need(head)
            if self._kv_fits(need):
                return user, need, True
            if not self.running:
                return user, need, False
            head.kv_blocked_since = head.kv_blocked_since or now
            if now - head.kv_blocked_since >= KV_BYPASS_S:
                break
        return None, 0, False

    def _room(self) -> int | None:
        """What the memory budget leaves this model's KV now (None: no budget)."""
        return self.kv_room() if self.kv_room is not None else None

    def _kv_need(self, handle: SequenceHandle) -> int:
        request = handle.sequence.request
        return self.engine.kv_bytes_for(len(request.prompt_ids) + request.max_tokens)

    def _kv_fits(self, need: int) -> bool:
        """Whether a sequence needing `need` KV bytes fits beside the running ones in what the budget
        leaves this model; the prefix cache gives way first (its oldest entries are dropped)."""
        room = self._room()
        if room is None:
            return True
        # What this model's KV will hold: the pool as allocated (free pages included), or as far as
        # the reservations grow it with this one.
        spare = room - max(self.engine.kv_bytes, self._kv_reserved + need)
        if 0 <= spare < self.prefix_cache.stats.bytes:  # only when that makes it fit
            self.prefix_cache.shrink_to(spare)
        return spare >= 0

    def _kv_refusal(self, handle: SequenceHandle, need: int) -> KVBudgetExceeded:
        request = handle.sequence.request
        room = self._room()
        return KVBudgetExceeded(
            f"the KV cache of this request ({len(request.prompt_ids)} prompt tokens + max_tokens "
            f"{request.max_tokens}: {need / 1e6:.1f} MB) does not fit in the memory budget, which leaves "
            f"{max(room or 0, 0) / 1e6:.1f} MB for model {self.name}'s KV after the loaded models' weights "
            "(--memory-budget-bytes); ask for fewer tokens or raise the budget")

    def _notify_positions(self) -> None:
        for position, handle in enumerate(self._admission_order(), start=1):
            if handle.position != position:
                handle.position = position
                handle.emit([QueuedEvent(position)])

    def _positions_moved(self) -> None:
        if len(self._prefilling) > 1 or self._n_waiting:
            with self._cond:
                self._notify_positions()

    def _drop_cancelled_waiting(self) -> None:
        changed = False  # pragma: no mutate  (only its truth is read: None is False)
        for user in list(self._waiting):
            queue = self._waiting[user]
            for handle in [h for h in queue if h.sequence.cancelled.is_set()]:
                queue.remove(handle)
                self._n_waiting -= 1
                handle.emit(handle.sequence.finish(FinishReason.CANCELLED))
                changed = True
            if not queue:
                del self._waiting[user]
        if changed:
            self._notify_positions()
            self.metrics.queue_length(self.name, self._n_waiting)

    def _release_user(self, handle: SequenceHandle, locked: bool) -> None:
        if not locked:
            with self._cond:
                self._release_user(handle, locked=True)
            return
        n = self._running_per_user.get(handle.user, 1) - 1
        if n:
            self._running_per_user[handle.user] = n
        else:
            self._running_per_user.pop(handle.user, None)

    # ---- the loop (scheduler thread) -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception as exc:  # a bug in the loop itself: fail everyone, refuse new work
            log.exception("scheduler of %s stopped", self.name)
            with self._cond:
                self._dead = f"{type(exc).__name__}: {exc}"
                waiting = [h for q in self._waiting.values() for h in q]
                self._waiting.clear()
                self._n_waiting = 0
            for handle in waiting + list(self._prefilling) + list(self._rows):
                if not handle.sequence.done:
                    handle.emit(handle.sequence.finish(FinishReason.ERROR, f"internal error: {self._dead}"))
            self._prefilling.clear()
            self._rows = []

    def _iterate(self) -> bool:
        """One round: admit, one prefill chunk, one decode step. False when the scheduler stops."""
        with self._cond:
            while not self._stop and not (self._n_waiting or self._prefilling or self._rows):
                self._cond.wait()
            if self._stop and not (self._prefilling or self._rows):
                for queue in self._waiting.values():
                    for handle in queue:
                        handle.emit(handle.sequence.finish(FinishReason.CANCELLED, "model unloaded"))
                self._waiting.clear()
                self._n_waiting = 0
                return False
            self._drop_cancelled_waiting()
            self._drop_cancelled_prefilling()
            if not self._stop:
                self._admit()
        if self._prefilling:
            self._prefill_chunk()
        if self._rows:
            try:
                self._decode_step()
            except Exception as exc:  # the batched step failed: its rows cannot go on
                log.exception("decode step of %s failed", self.name)
                self._fail_rows(f"{type(exc).__name__}: {exc}")
        return True

    def _drop_cancelled_prefilling(self) -> None:
        """Admitted sequences cancelled while waiting for their prefill free their slot now."""
        gone = [h for i, h in enumerate(self._prefilling) if i > 0 and h.sequence.cancelled.is_set()]
        for handle in gone:  # not the head: none of them began its prefill
            self._prefilling.remove(handle)
            # pragma: `locked` only saves taking self._cond again, and it is reentrant (an RLock)
            self._finish(handle, handle.sequence.finish(FinishReason.CANCELLED), locked=True)  # pragma: no mutate
        if gone:
            self._notify_positions()

    # pragma: `locked` only saves taking self._cond again, and it is reentrant (an RLock)
    def _finish(self, handle: SequenceHandle, events: list, locked: bool = False) -> None:  # pragma: no mutate
        handle.emit(events)
        finished = handle.sequence.finished
        if finished is not None:
            key = finished.reason.value
            self.stats.finished[key] = self.stats.finished.get(key, 0) + 1
            self.metrics.request_finished(self.name, key)
        self._kv_reserved -= handle.kv_reserved
        handle.kv_reserved = 0
        self._report_kv()
        self._release_user(handle, locked)  # pragma: no mutate

    def _prefill_chunk(self) -> None:
        handle = self._prefilling[0]
        seq = handle.sequence
        if seq.cancelled.is_set():
            self._leave_prefill(handle, seq.finish(FinishReason.CANCELLED))
            return
        try:
            self._prefill_step(handle)
        except Exception as exc:  # this sequence's failure is its own: the batch goes on
            log.exception("prefill of a sequence on %s failed", self.name)
            if handle.sequence.done:  # it finished before the failure (a metrics hook): its end, unsent
                self._leave_prefill(handle, [handle.sequence.finished])
            else:
                self._leave_prefill(handle, seq.finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}"))

    def _leave_prefill(self, handle: SequenceHandle, events: list) -> None:
        """The head of the prefill queue (`handle`) leaves it, ended with `events`."""
        self._prefilling.popleft()
        if handle.prefill is not None:
            self.engine.end_prefill(handle.prefill)
        handle.prefill = None  # pragma: no mutate  (drops the state's arrays; "" drops them too)
        self._positions_moved()
        self._finish(handle, events)
        self._fit_prefix_cache()

    def _prefill_step(self, handle: SequenceHandle) -> None:
        seq = handle.sequence
        prompt = seq.request.prompt_ids
        if handle.prefill is None:
            scope = seq.request.cache_scope
            reused, cached = self.prefix_cache.lookup(prompt, scope)
            handle.shared = self._shared_length(prompt)
            if handle.shared > reused:  # an operator-marked system prompt: every user's KV of it
                # pragma: the shared scope holds marked prompts only, none longer than handle.shared
                # that this prompt starts with, so a longer slice finds the same entry
                shared, kv = self.prefix_cache.lookup(prompt[: handle.shared + 1], SHARED_SCOPE)  # pragma: no mutate
                # pragma: a miss is (0, None) and 0 > reused never holds; an equal length reuses as much
                if kv is not None and shared > reused:  # pragma: no mutate
                    reused, cached = shared, kv
            if self.prefix_cache.enabled:
                self.metrics.prefix_cache(self.name, cached is not None, reused)
            if self.kv_disk is not None and seq.request.kv_key:  # a chat's turn: its KV may be on disk
                on_disk, kv = self.kv_disk.lookup(scope, seq.request.kv_key, prompt, better_than=reused)
                if kv is not None:
                    reused, cached = on_disk, kv
            handle.prefill = self.engine.new_prefill(cached, reused)
            handle.prefilled = reused
            seq.cached_prompt_tokens = reused
        chunk = prompt[handle.prefilled : handle.prefilled + self.config.prefill_chunk]
        logits = self.engine.prefill(handle.prefill, chunk)
        handle.prefilled += len(chunk)
        self.stats.prefill_chunks += 1
        if handle.prefilled < len(prompt):
            return
        events, token = seq.step(logits)
        if seq.count:
            self.metrics.time_to_first_token(self.name, seq.first_at - seq.request.received_at)
            self.metrics.tokens_generated(self.name, 1)
            self.stats.tokens_generated += 1
        if token is None:
            self._leave_prefill(handle, events)
            return
        self.engine.join(handle.prefill)
        if seq.request.share_prefill and self.prefix_cache.enabled:
            # Siblings of one request (n choices) reuse this prompt's KV instead of computing it again.
            self._store_prefix(prompt, self.engine.row_cache(len(self._rows)), seq.request.cache_scope)
        # In the batch before it leaves the prefill queue, so `busy` never reads False in between.
        self._rows.append(handle)
        self._prefilling.popleft()
        handle.prefill = None  # pragma: no mutate  (the engine holds it now; "" drops the reference too)
        handle.next_token = token
        self._positions_moved()
        handle.emit(events)

    def _decode_step(self) -> None:
        tokens = [h.next_token for h in self._rows]
        previous = [h.sequence.last_at for h in self._rows]
        logits = self.engine.step(tokens)
        self.stats.steps += 1
        self.stats.batch_size_sum += len(self._rows)
        leaving: list[int] = []
        produced = 0
        for row, handle in enumerate(self._rows):
            seq = handle.sequence
            count = seq.count
            try:
                events, token = seq.step(logits[row])
            except Exception as exc:  # one row's failure (e.g. its sampling) ends that row only
                log.exception("sampling a sequence on %s failed", self.name)
                events, token = seq.finish(FinishReason.ERROR, f"{type(exc).__name__}: {exc}"), None
            if seq.count > count:
                produced += 1
                self.metrics.inter_token_latency(self.name, seq.last_at - previous[row])
            if token is None:
                length = self.engine.lengths[row]
                if self.prefix_cache.enabled and seq.finished is not None and seq.finished.reason != FinishReason.ERROR:
                    tokens, kv = (seq.request.prompt_ids + seq.output_ids)[:length], self.engine.row_cache(row)
                    self._store_prefix(tokens, kv, seq.request.cache_scope)
                    if self.kv_disk is not None and seq.request.kv_key:  # written behind the turn
                        self.kv_disk.put(seq.request.cache_scope, seq.request.kv_key, tokens, kv)
                    if handle.shared:
                        self.prefix_cache.store_prefix(tokens, kv, handle.shared, SHARED_SCOPE)
                self._finish(handle, events)
                leaving.append(row)
            else:
                handle.emit(events)
                handle.next_token = token
        self.stats.tokens_generated += produced  # the last token of a leaving row counts too
        self.metrics.tokens_generated(self.name, produced)
        if leaving:
            self.engine.remove(leaving)
            self._rows = [h for i, h in enumerate(self._rows) if i not in set(leaving)]
            self._fit_prefix_cache()
        self.metrics.batch_size(self.name, len(self._rows))
        self._report_kv()

    def _report_kv(self) -> None:
        engine = self.engine
        self.metrics.kv_memory(self.name, engine.kv_bytes, getattr(engine, "kv_bytes_used", engine.kv_bytes),
                               self._kv_reserved, sum(engine.lengths))

    def _shared_length(self, prompt: list[int]) -> int:
        """The length of the longest marked shared prefix the prompt starts with (0: none)."""
        for ids in self.shared_prefixes:
            if len(ids) < len(prompt) and tuple(prompt[: len(ids)]) == ids:
                return len(ids)
        return 0

    def _store_prefix(self, tokens: list[int], kv: KVCache, scope: str) -> None:
        self.prefix_cache.store(tokens, kv, scope)
        self._report_prefix_cache()

    def _fit_prefix_cache(self) -> None:
        """After sequences left: the prefix cache keeps only what the budget leaves beside the
        engine's KV (the running reservations, or the pool as allocated); the engine first gives
        back pages nobody holds, so cached turns are not crowded out by free pages."""
        room = self._room()
        if room is None:
            return
        if room - max(self.engine.kv_bytes, self._kv_reserved) < self.prefix_cache.stats.bytes:
            self.engine.trim()
            self.prefix_cache.shrink_to(max(room - max(self.engine.kv_bytes, self._kv_reserved), 0))
            self._report_prefix_cache()

    def _report_prefix_cache(self) -> None:
        st = self.prefix_cache.stats
        self.metrics.prefix_cache_state(self.name, st.entries, st.bytes, st.evictions)

    def _fail_rows(self, message: str) -> None:
        """The batch's state is lost: end every running row (not yet finished) with ERROR."""
        for handle in self._rows:
            if not handle.sequence.done:
                self._finish(handle, handle.sequence.finish(FinishReason.ERROR, message))
        self._rows = []
        # A prompt half prefilled loses its KV with the rest: it starts its prefill again (it has
        # sent nothing yet), instead of going on over pages the reset gave back.
        for handle in self._prefilling:
            if handle.prefill is not None:
                self.engine.end_prefill(handle.prefill)
                handle.prefill, handle.prefilled = None, 0
        self.engine.reset()
        self._report_kv()

# pragma: a test helper's bound; a second more or the boundary instant changes nothing
def wait_idle(scheduler: Scheduler, timeout: float = 30) -> bool:  # pragma: no mutate
    deadline = time.monotonic() + timeout
    while scheduler.busy and time.monotonic() < deadline:  # pragma: no mutate
        time.sleep(0.01)
    return not scheduler.busy
