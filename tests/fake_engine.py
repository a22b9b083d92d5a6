"""A model-free `BatchEngine` and a tiny real tokenizer, for scheduler tests that run in milliseconds.

`FakeEngine` computes no attention, but it keeps real per-row KV in the prefix cache's layout
(per layer [1, KV_HEADS, length, HEAD_DIM], seq axis 2) and its values *are* the tokens seen:
position i of layer l holds `token_i + 1000 * l`. Its next token is a function of that whole
history, read back from the KV (`next_token`), so a sequence's tokens do not depend on the
batch it ran in, and a wrong or misaligned reused prefix gives other tokens. `expected` is
what a sequence run alone (greedy) produces, to compare the scheduler's output against.

Knobs for the tests: `eos_after` (every row ends with EOS after that many tokens), `POISON`
in a prompt makes its prefill raise, `step_delay` sleeps in each step, `hooks[name]` runs at
the start of `prefill`/`step`/`reset`/... (to cancel, raise or record at an exact point),
and `hold()`/`release()` park the scheduler thread inside the next prefill or step so a test
can queue requests while it cannot admit them. `log` records every prefill chunk and step,
naming each sequence by the first token of its prompt (tests give requests distinct first
tokens).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from tokenwire.server.engine.batch_engine import BatchEngine, KVCache, PrefillState
from tokenwire.server.engine.scheduler import Scheduler, SchedulerConfig, SequenceHandle
from tokenwire.server.engine.sequence import FinishedEvent, RefusedEvent, TokenEvent
from tokenwire.server.engine.tokenizer import TokenizerBundle

EOS = 0
UNK = 1
POISON = 2  # a prompt holding it fails in prefill
FIRST_WORD = 3  # ids FIRST_WORD.. are the words "w3", "w4", ...; generated tokens are words only
VOCAB = 48
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4
WORDS = ["<eos>", "<unk>", "boom"] + [f"w{i}" for i in range(FIRST_WORD, VOCAB)]


def next_token(history: list[int]) -> int:
    """The fake model: the next word after `history`, never EOS, UNK or POISON."""
    h = 0
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return FIRST_WORD + (h + 7 * len(history)) % (VOCAB - FIRST_WORD)


def expected(prompt: list[int], max_tokens: int, eos_after: int | None = None) -> list[int]:
    """The tokens a sequence with this prompt gets on its own (greedy, EOS not ignored)."""
    out: list[int] = []
    while len(out) < max_tokens and (eos_after is None or len(out) < eos_after):
        out.append(next_token(prompt + out))
    return out


def prompt(tag: int, length: int = 4) -> list[int]:
    """A prompt of `length` words starting with its own `tag` token (the engine's log names it so)."""
    return [tag] + [FIRST_WORD + (tag + i) % 20 for i in range(1, length)]


def make_tokenizer() -> TokenizerBundle:
    """A real TokenizerBundle over a WordLevel vocab of VOCAB words ("<eos>" special, id 0),
    written to and read from a temporary folder (a few milliseconds)."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken("<eos>", special=True)])
    with tempfile.TemporaryDirectory(prefix="fake-tokenizer-") as tmp:
        folder = Path(tmp)
        tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "config.json").write_text(json.dumps({"eos_token_id": EOS}))
        return TokenizerBundle(folder)


def _empty_kv() -> KVCache:
    return [np.zeros((1, KV_HEADS, 0, HEAD_DIM), dtype=np.float32) for _ in range(LAYERS)]


def _append(kv: KVCache, tokens: list[int]) -> KVCache:
    t = np.asarray(tokens, dtype=np.float32).reshape(1, 1, -1, 1)
    return [np.concatenate([layer, np.broadcast_to(t + 1000 * i, (1, KV_HEADS, len(tokens), HEAD_DIM))], axis=2)
            for i, layer in enumerate(kv)]


def _tokens(kv: KVCache) -> list[int]:
    """The history a cache holds; raises if its layers or heads disagree (a corrupted prefix)."""
    first = kv[0][0, 0, :, 0]
    for i, layer in enumerate(kv):
        if not np.array_equal(layer, np.broadcast_to(first.reshape(1, 1, -1, 1) + 1000 * i, layer.shape)):
            raise ValueError(f"KV layer {i} does not match layer 0")
    return [int(v) for v in first]


class FakePrefill(PrefillState):
    def __init__(self) -> None:
        super().__init__()
        self.cache = _empty_kv()


class FakeEngine(BatchEngine):
    def __init__(self, eos_after: int | None = None, step_delay: float = 0.0) -> None:
        self.eos_after = eos_after
        self.step_delay = step_delay
        self.hooks: dict[str, Callable[..., None]] = {}
        self.log: list[tuple] = []  # ("prefill", name, chunk length) and ("step", (name of each row, ...))
        self.steps = 0
        self.resets = 0
        self.ended_prefills = 0
        self._rows: list[tuple[KVCache, int]] = []  # (KV, prompt length) per row
        self._open = threading.Event()
        self._open.set()
        self.parked = threading.Event()

    # ---- test controls -----------------------------------------------------------------------

    def hold(self) -> None:
        """The next prefill or step waits until `release()`."""
        self.parked.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def until_parked(self, timeout: float = 5) -> None:
        """Returns once the scheduler thread waits inside a held prefill or step."""
        deadline = time.monotonic() + timeout
        while not self.parked.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("the scheduler never reached the held engine")
            await asyncio.sleep(0.001)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(entry[1]) for entry in self.log if entry[0] == "step"]

    def _enter(self, name: str, *args) -> None:
        if not self._open.is_set():
            self.parked.set()
            if not self._open.wait(timeout=10):
                raise TimeoutError("the test never released the engine")
        hook = self.hooks.get(name)
        if hook is not None:
            hook(*args)

    def _logits(self, kv: KVCache, prompt_length: int) -> np.ndarray:
        history = _tokens(kv)
        produced = len(history) - prompt_length  # tokens this sequence already generated
        logits = np.zeros(VOCAB, dtype=np.float32)
        if self.eos_after is not None and produced >= self.eos_after:
            logits[EOS] = 50.0
        else:
            logits[next_token(history)] = 50.0
        return logits

    # ---- BatchEngine -------------------------------------------------------------------------

    @property
    def kv_bytes(self) -> int:
        return sum(layer.nbytes for kv, _ in self._rows for layer in kv)

    def kv_bytes_for(self, tokens: int) -> int:
        return tokens * LAYERS * KV_HEADS * HEAD_DIM * np.dtype(np.float32).itemsize

    @property
    def lengths(self) -> list[int]:
        return [kv[0].shape[2] for kv, _ in self._rows]

    def new_prefill(self, prefix: KVCache | None = None, prefix_length: int = 0) -> PrefillState:
        state = FakePrefill()
        if prefix is not None:
            if len(prefix) != LAYERS or any(p.shape != (1, KV_HEADS, prefix_length, HEAD_DIM) for p in prefix):
                raise ValueError(f"prefix of shapes {[p.shape for p in prefix]} for length {prefix_length}")
            _tokens(prefix)
            state.cache = [p.copy() for p in prefix]
            state.length = prefix_length
        return state

    def prefill(self, state: PrefillState, tokens: list[int]) -> np.ndarray:
        self._enter("prefill", state, tokens)
        if not tokens:
            raise ValueError("empty prefill chunk")
        if POISON in tokens:
            raise RuntimeError("poisoned prompt")
        state.cache = _append(state.cache, tokens)
        state.length += len(tokens)
        self.log.append(("prefill", _tokens(state.cache)[0], len(tokens)))
        return self._logits(state.cache, state.length)

    def join(self, state: PrefillState) -> None:
        self._enter("join", state)
        self._rows.append((state.cache, state.length))

    def end_prefill(self, state: PrefillState) -> None:
        self.ended_prefills += 1  # only prefills that leave without joining

    def step(self, tokens: list[int]) -> np.ndarray:
        self._enter("step", tokens)
        if len(tokens) != len(self._rows):
            raise ValueError(f"{len(tokens)} tokens for {len(self._rows)} rows")
        if self.step_delay:
            time.sleep(self.step_delay)
        self.steps += 1
        self._rows = [(_append(kv, [t]), n) for (kv, n), t in zip(self._rows, tokens, strict=True)]
        self.log.append(("step", tuple(int(kv[0][0, 0, 0, 0]) for kv, _ in self._rows)))
        return np.stack([self._logits(kv, n) for kv, n in self._rows])

    def row_cache(self, row: int) -> KVCache:
        return [layer.copy() for layer in self._rows[row][0]]

    def remove(self, rows: list[int]) -> None:
        self._enter("remove", rows)
        gone = set(rows)
        self._rows = [r for i, r in enumerate(self._rows) if i not in gone]

    def reset(self) -> None:
        self._enter("reset")
        self.resets += 1
        self._rows = []


# ---- fixtures of the scheduler tests (tests/conftest.py loads this module as a plugin) ---------

@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def start():
    """start(engine=None, **SchedulerConfig fields) -> (scheduler, engine); the prefix cache is
    off unless asked for. Every scheduler is stopped at the end of the test."""
    started: list[Scheduler] = []

    def start(engine: FakeEngine | None = None, **config) -> tuple[Scheduler, FakeEngine]:
        engine = engine or FakeEngine()
        scheduler = Scheduler(engine, SchedulerConfig(**{"prefix_cache_bytes": 0, **config}), name="fake")
        started.append(scheduler)
        return scheduler, engine

    yield start
    for scheduler in started:
        scheduler.engine.release()
        scheduler.stop()


async def outcome(handle: SequenceHandle, timeout: float = 5):
    """(token ids, the last event: FinishedEvent or RefusedEvent) of one stream."""

    async def run():
        tokens = []
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
            elif isinstance(event, FinishedEvent | RefusedEvent):
                return tokens, event
        raise AssertionError("no last event")

    return await asyncio.wait_for(run(), timeout)
