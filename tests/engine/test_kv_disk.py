"""The disk tier's own rules, on synthetic KV arrays in a real folder: what a lookup returns, what
it refuses (corrupt, stale, another owner's), permissions, the newest-only rule, the LRU budget,
deletion with the chat, and a writer that never makes its caller wait.

The real model's KV restored from disk is checked in test_kv_restore.py; a real server restarted
between two turns in tests/api/test_kv_restart.py."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tokenwire.server.engine import kv_disk
from tokenwire.server.engine.kv_disk import KVDiskTier, folder_name
from tokenwire.server.engine.kv_file import TEMP_MARK, CorruptKVFile, read_arrays, read_header

MODEL, PRINT = "tiny:test", "fingerprint-a"
TOKENS = list(range(100, 140))  # 40 tokens
OWNER = "key-user:1"


def kv_of(n: int, seed: int = 0, layers: int = 3) -> list[np.ndarray]:
    """Per layer [1, kv_heads, n, head_dim], fp16 like the native graph's cache."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 2, n, 8)).astype(np.float16) for _ in range(layers)]


def nbytes(n: int) -> int:
    return sum(a.nbytes for a in kv_of(n))


@pytest.fixture
def tier(tmp_path: Path):
    t = KVDiskTier(tmp_path / "kv", budget_bytes=1 << 20)
    yield t
    t.close(timeout=5)


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def written(tier: KVDiskTier, chat: str = "c1", tokens=TOKENS, scope: str = OWNER, seed: int = 0,
            model: str = MODEL, fingerprint: str = PRINT) -> Path:
    """Puts one turn's KV, waits for the writer, returns the chat's file."""
    store = tier.for_model(model, fingerprint)
    assert store.put(scope, chat, list(tokens), kv_of(len(tokens), seed))
    assert tier.flush(5)
    [path] = [p for p in store.chat_folder(chat).iterdir()]
    return path


def test_a_turn_written_behind_is_restored_for_the_prompt_that_extends_it(tier: KVDiskTier) -> None:
    path = written(tier)
    store = tier.for_model(MODEL, PRINT)
    n, kv = store.lookup(OWNER, "c1", TOKENS + [7, 8, 9])
    assert n == len(TOKENS)
    for got, want in zip(kv, kv_of(len(TOKENS)), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    header = read_header(path).header
    assert (header.model, header.fingerprint, header.scope, header.chat) == (MODEL, PRINT, OWNER, "c1")
    assert header.tokens == tuple(TOKENS) and header.shapes == ((1, 2, 40, 8),) * 3 and header.dtype == "<f2"
    assert path.parent == tier.root / folder_name(MODEL) / "c1" and folder_name(MODEL) == "tiny_test"
    assert tier.stats.hits == 1 and tier.stats.reused_tokens == len(TOKENS)


def test_a_prompt_that_diverges_reuses_the_common_part_and_one_token_is_left_to_prefill(tier: KVDiskTier) -> None:
    written(tier)
    store = tier.for_model(MODEL, PRINT)
    n, kv = store.lookup(OWNER, "c1", TOKENS[:25] + [1, 2, 3])
    assert n == 25 and all(np.array_equal(a, b[:, :, :25]) for a, b in zip(kv, kv_of(40), strict=True))
    assert store.lookup(OWNER, "c1", TOKENS)[0] == len(TOKENS) - 1  # the whole prompt: its last token is run
    assert store.lookup(OWNER, "c1", TOKENS[:5] + [0] * 40) == (0, None)  # under min_match
    assert store.lookup(OWNER, "c1", TOKENS + [1], better_than=len(TOKENS)) == (0, None)  # memory did as well
    assert tier.stats.misses == 1, "a lookup the memory cache already served is not a disk miss"


def test_files_are_private_and_never_read_for_another_owner(tier: KVDiskTier) -> None:
    path = written(tier)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (tier.root, path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    store = tier.for_model(MODEL, PRINT)
    for scope in ("", "key-user:2"):
        assert store.lookup(scope, "c1", TOKENS + [1]) == (0, None)
    assert path.exists(), "another owner's lookup leaves the file alone"
    assert store.lookup(OWNER, "c1", TOKENS + [1])[0] == len(TOKENS)


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["payload byte", "token id in the header", "truncated", "bad magic"])
def test_a_damaged_file_is_ignored_and_deleted(tier: KVDiskTier, damage: str) -> None:
    path = written(tier)
    raw = path.read_bytes()
    if damage == "payload byte":
        flip(path, len(raw) - 100)
    elif damage == "token id in the header":  # still valid JSON: only the digest can tell
        at = raw.index(b",139]")
        path.write_bytes(raw[: at + 1] + b"130" + raw[at + 4:])
        assert read_header(path).header.tokens[-1] == 130
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        flip(path, 0)
    store = tier.for_model(MODEL, PRINT)
    assert store.lookup(OWNER, "c1", TOKENS + [1]) == (0, None)
    assert not path.exists() and tier.stats.corrupt == 1 and tier.stats.files == 0


def test_the_digest_check_itself_refuses_a_flipped_byte(tier: KVDiskTier) -> None:
    path = written(tier)
    flip(path, path.stat().st_size - 1)
    with pytest.raises(CorruptKVFile, match="digest"):
        read_arrays(read_header(path))


def test_stale_files_are_ignored_but_kept(tier: KVDiskTier) -> None:
    path = written(tier)
    rebuilt = tier.for_model(MODEL, "fingerprint-b")  # the model's graph was rebuilt
    assert rebuilt.lookup(OWNER, "c1", TOKENS + [1]) == (0, None)
    assert path.exists() and tier.stats.stale == 1
    data = bytearray(path.read_bytes())
    data[4] = 99  # another format version
    path.write_bytes(bytes(data))
    assert tier.for_model(MODEL, PRINT).lookup(OWNER, "c1", TOKENS + [1]) == (0, None)
    assert path.exists() and tier.stats.stale == 2 and tier.stats.corrupt == 0


def test_only_the_newest_file_of_a_chat_is_kept(tier: KVDiskTier) -> None:
    first = written(tier)
    longer = TOKENS + [200, 201, 202]
    second = written(tier, tokens=longer, seed=1)  # written() asserts the folder holds one file
    assert not first.exists() and second.exists()
    n, kv = tier.for_model(MODEL, PRINT).lookup(OWNER, "c1", longer + [5])
    assert n == len(longer) and np.array_equal(kv[0], kv_of(len(longer), 1)[0])


def test_the_budget_evicts_the_least_recently_used_and_the_order_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    tier = KVDiskTier(root, budget_bytes=1 << 20)
    try:
        a = written(tier, "a")
        written_size = a.stat().st_size
    finally:
        tier.close()
    size = 2 * written_size + written_size // 2  # room for two files
    tier = KVDiskTier(root, budget_bytes=size)
    try:
        b = written(tier, "b")
        time.sleep(0.01)
        assert tier.for_model(MODEL, PRINT).lookup(OWNER, "a", TOKENS + [1])[0] == 40  # a is used again
        time.sleep(0.01)
        c = written(tier, "c")
        assert a.exists() and c.exists() and not b.exists(), "b was the least recently used"
        assert tier.stats.evictions == 1 and tier.stats.bytes == 2 * written_size
    finally:
        tier.close()
    # A restart with a smaller budget: the scan finds both files and evicts by their mtimes.
    tier = KVDiskTier(root, budget_bytes=written_size)
    try:
        assert c.exists() and not a.exists() and tier.stats.files == 1
    finally:
        tier.close()


def test_a_file_bigger_than_the_whole_budget_is_not_written(tmp_path: Path) -> None:
    tier = KVDiskTier(tmp_path / "kv", budget_bytes=nbytes(40) // 2)
    try:
        assert not tier.for_model(MODEL, PRINT).put(OWNER, "c1", TOKENS, kv_of(40))
        assert tier.flush(5) and files(tier.root) == []
    finally:
        tier.close()


def test_deleting_a_chat_deletes_its_files_under_every_model_and_later_writes_of_it(tier: KVDiskTier) -> None:
    mine = written(tier, "c1")
    other_model = written(tier, "c1", model="other:model")
    kept = written(tier, "c2")
    assert tier.delete_chat("c1") == 2
    assert not mine.exists() and not other_model.exists() and not mine.parent.exists() and kept.exists()
    # A turn of the deleted chat that was still running when it went: its KV is not written after.
    assert not tier.for_model(MODEL, PRINT).put(OWNER, "c1", TOKENS, kv_of(40))
    assert tier.flush(5) and not mine.parent.exists()
    assert tier.stats.files == 1


def test_a_write_queued_or_in_flight_when_its_chat_is_deleted_leaves_no_file(tier: KVDiskTier, monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = kv_disk.write_kv_file

    def slow_write(path, header, kv, commit):
        entered.set()
        release.wait(5)
        return real(path, header, kv, commit)

    monkeypatch.setattr(kv_disk, "write_kv_file", slow_write)
    store = tier.for_model(MODEL, PRINT)
    assert store.put(OWNER, "c1", TOKENS, kv_of(40))  # taken by the writer, which waits
    assert entered.wait(5)
    assert store.put(OWNER, "c2", TOKENS, kv_of(40))  # queued behind it
    tier.delete_chat("c1")
    tier.delete_chat("c2")
    release.set()
    assert tier.flush(5)
    assert files(tier.root) == [] and tier.stats.writes == 0 and tier.stats.failed == 0


def test_a_full_queue_drops_the_write_at_once_instead_of_waiting(tmp_path: Path, monkeypatch) -> None:
    release = threading.Event()
    real = kv_disk.write_kv_file
    monkeypatch.setattr(kv_disk, "write_kv_file", lambda *a: (release.wait(5), real(*a))[1])
    tier = KVDiskTier(tmp_path / "kv", budget_bytes=1 << 20, queue_size=1)
    try:
        store = tier.for_model(MODEL, PRINT)
        assert store.put(OWNER, "a", TOKENS, kv_of(40))  # the writer holds it
        wait_until_writing(tier)
        assert store.put(OWNER, "b", TOKENS, kv_of(40))  # queued
        assert store.put(OWNER, "b", TOKENS + [1], kv_of(41))  # replaces b's queued write: one file per chat
        started = time.perf_counter()
        assert not store.put(OWNER, "c", TOKENS, kv_of(40))  # the queue is full: dropped
        assert time.perf_counter() - started < 0.1 and tier.stats.dropped == 1
        release.set()
        assert tier.flush(5)
        assert tier.stats.writes == 2
        assert read_header(next(store.chat_folder("b").iterdir())).header.tokens == tuple(TOKENS + [1])
    finally:
        release.set()
        tier.close()


def wait_until_writing(tier: KVDiskTier) -> None:
    deadline = time.monotonic() + 5
    while tier._queue or not tier._writing:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_close_writes_what_is_queued_and_a_crashed_write_is_cleaned_at_start(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    tier = KVDiskTier(root, budget_bytes=1 << 20)
    store = tier.for_model(MODEL, PRINT)
    for i in range(4):
        assert store.put(OWNER, f"chat{i}", TOKENS, kv_of(40, i))
    assert tier.close(timeout=10)
    assert len(files(root)) == 4
    assert not store.put(OWNER, "late", TOKENS, kv_of(40)), "a closed tier takes no writes"
    leftover = store.chat_folder("chat0") / f".x.kv{TEMP_MARK}1234"
    leftover.write_bytes(b"half a file")
    again = KVDiskTier(root, budget_bytes=1 << 20)
    try:
        assert not leftover.exists() and again.stats.files == 4
        n, kv = again.for_model(MODEL, PRINT).lookup(OWNER, "chat3", TOKENS + [1])
        assert n == 40 and np.array_equal(kv[2], kv_of(40, 3)[2])
    finally:
        again.close()


def test_odd_chat_ids_stay_inside_the_folder(tier: KVDiskTier) -> None:
    for chat in ("../../escape", "a/b", ".hidden", "x" * 200):
        path = written(tier, chat)
        assert path.resolve().is_relative_to(tier.root.resolve()) and path.parent.parent == tier.root / "tiny_test"
        assert tier.for_model(MODEL, PRINT).lookup(OWNER, chat, TOKENS + [1])[0] == 40
        assert tier.delete_chat(chat) == 1 and not path.exists()
    assert os.listdir(tier.root / "tiny_test") == []
