"""`tokenwire check MODEL`: how far a model imported from a GGUF strays from the file itself.

Teacher-forced over the fixed text pull uses (server/build/data/eval_text.txt): the served graph
(`model_native.onnx`, run by the engine that serves it, one token per decode step) against the numpy
float reference of the same file (gguf_reference.py), position by position: top-1 agreement, mean
KL(reference || served), each one's perplexity. Recorded in the manifest's "quality" with how many
tokens were used and, when fewer than the text's, why (a model too big for the whole text in the
reference's time or memory budget).

Both sides stream: the reference's hidden states [T, hidden] are kept, its logits and the served
graph's are made and compared 256 positions at a time (fewer for a large vocabulary).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenwire.server.models.store import read_manifest, write_manifest

from .gguf_reference import GGUFFile, ReferenceModel, read_hparams
from .quality import DEFAULT_MAX_TOKENS, Agreement, eval_text

SOURCE_LINK = "source.gguf"
CHUNK = 256
CHUNK_LOGITS = 4 << 20  # logits compared at once, at most (a 262k vocabulary: 16 positions)
# The reference's work: about 2 x parameters x tokens flop in numpy (tens of GFLOP/s on two cores):
# 4e12 is about a minute or two; beyond that the text is shortened.
REFERENCE_FLOP_BUDGET = 4e12
MIN_TOKENS = 64
# What `tokenwire import` checks: the served side runs one decode step per token (0.5B Q4_K_M: ~0.23 s
# a step on this shared 2-core machine, 8 min for 2,048 tokens), so an import checks the text's first
# 512 tokens and `tokenwire check` the whole (DEFAULT_MAX_TOKENS).
IMPORT_MAX_TOKENS = 512


class CheckError(RuntimeError):
    """The model cannot be checked (not imported from a GGUF, the file gone, ...)."""


def source_gguf(model_dir: Path) -> Path:
    """The GGUF a model was imported from: its folder's `source.gguf` link, else the manifest's source."""
    link = model_dir / SOURCE_LINK
    if link.is_file():  # a regular file (a link planted to a FIFO or a device would block or never end)
        return link
    source = read_manifest(model_dir).get("source", {})
    path = source.get("gguf") if isinstance(source, dict) else None
    if path and Path(path).is_file():
        return Path(path)
    if link.is_symlink() or path:
        raise CheckError(f"{model_dir.name}: its source GGUF is gone ({path or link.readlink()}); "
                         "the check compares the served graph with that file")
    raise CheckError(f"{model_dir.name} was not imported from a GGUF file: `tokenwire check` compares a "
                     "GGUF import's served graph with the file it came from")


@dataclass(frozen=True)
class Plan:
    tokens: list[int]
    text_tokens: int
    shortened_because: str  # "" when the whole text (up to max_tokens) is used


def _layer_bytes(f: GGUFFile, itemsize: int) -> int:
    """The most float bytes one layer's weights take dequantized."""
    per_layer: dict[str, int] = {}
    for name, t in f.tensors.items():
        if name.startswith("blk."):
            layer = name.split(".")[1]
            per_layer[layer] = per_layer.get(layer, 0) + int(t.n_elements) * itemsize
    return max(per_layer.values(), default=0)


def chunk_rows(n_vocab: int) -> int:
    """Positions compared at a time: CHUNK, fewer for a large vocabulary."""
    return max(8, min(CHUNK, CHUNK_LOGITS // max(1, n_vocab)))


def reference_memory(f: GGUFFile, itemsize: int = 4) -> tuple[int, int]:
    """(bytes the reference and the comparison hold whatever the text's length, bytes per token):
    one layer's weights dequantized (with temporaries), the output matrix when kept, two models'
    logit chunks in float64, the attention scores; per token the activations of one layer."""
    from .gguf_reference import OUTPUT_KEEP_BYTES, SCORES

    hp = read_hparams(f)
    down = f.tensors.get("blk.0.ffn_down.weight")
    ffn = int(down.shape[0]) if down is not None else 4 * hp.n_embd
    per_token = itemsize * (8 * hp.n_embd + 4 * ffn + 3 * hp.n_head * hp.head_dim)
    fixed = (3 * _layer_bytes(f, itemsize) + min(hp.n_vocab * hp.n_embd * itemsize, OUTPUT_KEEP_BYTES)
             + 6 * chunk_rows(hp.n_vocab) * hp.n_vocab * 8 + 3 * SCORES * itemsize)
    return fixed, per_token


def plan(model_dir: Path, gguf: Path | GGUFFile, max_tokens: int = DEFAULT_MAX_TOKENS, itemsize: int = 4,
         memory: int | None = None) -> Plan:
    """The tokens to check: the fixed text, cut to `max_tokens`, then to what the reference can do
    within REFERENCE_FLOP_BUDGET and in half the memory available (its activations and attention
    scores grow with the text; one layer's weights and the output matrix do not)."""
    from tokenwire.server.engine.tokenizer import TokenizerBundle

    from .importer import available_memory

    text = TokenizerBundle(model_dir).encode(eval_text())
    tokens = text[:max_tokens]
    f = gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)
    params = sum(int(t.n_elements) for t in f.tensors.values())
    limits = {"time": (int(REFERENCE_FLOP_BUDGET / (2 * max(params, 1))),
                       f"{params / 1e9:.2f}B parameters: the reference's budget of {REFERENCE_FLOP_BUDGET:.0e} flop")}
    memory = available_memory() if memory is None else memory
    if memory:
        fixed, per_token = reference_memory(f, itemsize)
        limits["memory"] = (max(0, int((memory // 2 - fixed) // per_token)),
                            f"{memory / 2**30:.1f} GiB of memory available")
    keep = min([len(tokens)] + [n for n, _ in limits.values()])
    why = "; ".join(f"{kind}: {what} covers {n} tokens" for kind, (n, what) in limits.items() if n < len(tokens))
    if keep < MIN_TOKENS:
        raise CheckError(f"{model_dir.name} is too big to check here ({why})")
    return Plan(tokens[:keep], len(text), why)


def served_logits(model_dir: Path, tokens: list[int], rows: int = CHUNK) -> Iterator[np.ndarray]:
    """The served model's next-token logits at every position, teacher-forced one token per step
    through the engine that serves it, `rows` positions at a time ([rows, V] float32)."""
    from tokenwire.server.engine.graph import open_engine

    engine, _ = open_engine(model_dir, context_length=len(tokens) + 1, model_id=model_dir.name)
    state = engine.new_prefill()
    try:
        block: list[np.ndarray] = []
        for token in tokens:
            block.append(np.array(engine.prefill(state, [token]), dtype=np.float32))
            if len(block) == rows:
                yield np.stack(block)
                block = []
        if block:
            yield np.stack(block)
    finally:
        engine.end_prefill(state)


def compare_streams(reference: Iterator[np.ndarray], served: Iterator[np.ndarray], tokens: list[int]) -> dict[str, float]:
    """quality.py's measures over two streams of logit chunks for positions 0..T-2 (the last
    position has no next token); each pair of chunks must cover the same positions."""
    targets = np.asarray(tokens[1:])
    totals = Agreement()
    start = 0
    for ref, cand in zip(reference, served, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"logit chunks differ in shape: {ref.shape} vs {cand.shape}")
        stop = min(start + len(ref), len(targets))
        if stop > start:
            totals.add(ref[:stop - start], cand[:stop - start], targets[start:stop])
        start += len(ref)
    if start != len(tokens):
        raise ValueError(f"the logits cover {start} positions, the text {len(tokens)}")
    return totals.result()


def check_model(model_dir: Path, max_tokens: int = DEFAULT_MAX_TOKENS, dtype: type = np.float32,
                write: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Checks an imported GGUF model's folder; returns (and with `write` records) its "quality"."""
    model_dir = Path(model_dir)
    gguf = source_gguf(model_dir)
    say = progress or (lambda _: None)
    started = time.monotonic()
    try:  # gguf.GGUFReader: seconds for a large vocabulary, so once
        reference = ReferenceModel(gguf, dtype)
    except (ValueError, OSError) as exc:  # the file replaced, or a variant it does not know (ReferenceUnsupported)
        raise CheckError(f"{model_dir.name}: the reference forward cannot read {gguf}: {exc}") from exc
    p = plan(model_dir, reference.file, max_tokens, np.dtype(dtype).itemsize)
    say(f"reference forward of {gguf.resolve().name} ({np.dtype(dtype).name}) over {len(p.tokens)} tokens"
        + (f" (shortened from {min(p.text_tokens, max_tokens)}: {p.shortened_because})" if p.shortened_because else ""))
    hidden = reference.hidden_states(p.tokens)
    ref_seconds = time.monotonic() - started
    say(f"served graph, teacher-forced one token per step over {len(p.tokens)} tokens")
    started = time.monotonic()
    rows = chunk_rows(reference.hp.n_vocab)
    result: dict[str, Any] = compare_streams(reference.logit_chunks(hidden, rows),
                                             served_logits(model_dir, p.tokens, rows), p.tokens)
    result.update({
        "reference": f"gguf_reference {np.dtype(dtype).name} forward of {SOURCE_LINK}",
        "method": "teacher-forced over the fixed text, the served graph one token per decode step",
        "text_tokens": p.text_tokens,
        "shortened": bool(p.shortened_because),
        "shortened_because": p.shortened_because,
        "reference_seconds": round(ref_seconds, 1),
        "compare_seconds": round(time.monotonic() - started, 1),
    })
    if write:
        manifest = read_manifest(model_dir)
        manifest["quality"] = result
        write_manifest(model_dir, manifest)
    return result


def _number(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1e6 else f"{x:.3e}"


def format_table(model_id: str, q: dict[str, Any]) -> str:
    """The check's figures as a small table."""
    shortened = f" (shortened from {q['text_tokens']}: {q['shortened_because']})" if q.get("shortened") else ""
    kl = q["mean_kl"]
    rows = [("top-1 agreement", f"{q['top1_agreement']:.2%}", ""), ("mean KL", f"{kl:.5f}" if kl >= 1e-3 else f"{kl:.2e}", ""),
            ("perplexity", _number(q["perplexity"]), _number(q["perplexity_reference"]))]
    lines = [f"{model_id}: served graph vs {q['reference']}, {q['tokens']} tokens of the fixed text{shortened}",
             f"  {'':<16} {'served':>12} {'reference':>12}"]
    lines += [f"  {name:<16} {a:>12} {b:>12}" for name, a, b in rows]
    return "\n".join(lines)


def check_import(model_dir: Path, progress: Callable[[str], None]) -> dict[str, Any] | None:
    """What `tokenwire import` runs after a GGUF import (unless --no-check): the check, recorded,
    its table told through `progress`. A model that cannot be checked here stays imported, unchecked."""
    try:
        q = check_model(model_dir, max_tokens=IMPORT_MAX_TOKENS, progress=progress)
    except CheckError as exc:
        progress(f"check skipped: {exc} (the model is imported; `tokenwire check` can try again)")
        return None
    progress(format_table(read_manifest(model_dir).get("id", model_dir.name), q))
    return q
