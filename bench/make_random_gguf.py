"""A random-weight 1.5B GGUF in Q4_K_M, for measuring import and serving at a real model's size.

The config is Qwen2.5-1.5B's (architecture qwen2: hidden 1536, 28 layers, 12 query heads and 2 KV
heads of 128, intermediate 8960, q/k/v biases, tied embedding, rope base 1e6, RMS eps 1e-6) with
the vocabulary and tokenizer metadata of a real GGUF (`--tokenizer-from`; by default the
qwen2.5-coder-0.5b file `tokenwire pull` joins, whose vocabulary is Qwen2.5's 151,936 tokens, else
the default model's SmolLM2 GGUF with layers added until the model has >= 1.5B parameters).
Weights are normal with std 0.02 (norm weights 1, biases 0), so activations stay finite over the
28 layers. Written as F16 with gguf.GGUFWriter one tensor at a time (the header and tensor infos
first, then each tensor generated, written and dropped: at most one tensor, the 467 MB embedding,
in memory), then quantized by llama.cpp's own `llama-quantize` (bench/peers/setup.sh server) to
Q4_K_M, the F16 file deleted. Seeded, so the same command makes the same file.

    .venv/bin/python bench/make_random_gguf.py [--out FILE] [--tokenizer-from GGUF] [--keep-f16]

Prints the output path last. Cached: an existing output is kept (--force rebuilds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PEERS_CACHE = Path(os.environ.get("TOKENWIRE_PEERS_CACHE", Path.home() / ".cache" / "tokenwire" / "peers"))
LLAMA_CPP_PYTHON_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
MODELS = Path(os.environ.get("TOKENWIRE_MODELS", Path.home() / ".local" / "share" / "tokenwire" / "models"))
TOKENIZER_SOURCES = (MODELS / ".cache" / "qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf",
                     MODELS / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf")
STD = 0.02
MIN_PARAMS = 1.5e9
ROWS_PER_DRAW = 8192  # rows of a tensor generated at a time (fp32), written into its fp16 array


@dataclass(frozen=True)
class Config:
    """Qwen2.5-1.5B's shape (its config.json), with the vocabulary of the tokenizer used."""

    vocab: int = 151936
    hidden: int = 1536
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    intermediate: int = 8960
    context: int = 32768
    rope_base: float = 1e6
    rms_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], str]]:
        """(GGUF name, numpy shape = reversed ne, kind) in llama.cpp's order; kind is "weight",
        "norm" (ones) or "bias" (zeros). Tied embedding: no output.weight."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        yield "token_embd.weight", (self.vocab, h), "weight"
        for i in range(self.layers):
            b = f"blk.{i}."
            yield b + "attn_norm.weight", (h,), "norm"
            yield b + "attn_q.weight", (h, h), "weight"
            yield b + "attn_q.bias", (h,), "bias"
            yield b + "attn_k.weight", (kv, h), "weight"
            yield b + "attn_k.bias", (kv,), "bias"
            yield b + "attn_v.weight", (kv, h), "weight"
            yield b + "attn_v.bias", (kv,), "bias"
            yield b + "attn_output.weight", (h, h), "weight"
            yield b + "ffn_norm.weight", (h,), "norm"
            yield b + "ffn_gate.weight", (self.intermediate, h), "weight"
            yield b + "ffn_up.weight", (self.intermediate, h), "weight"
            yield b + "ffn_down.weight", (h, self.intermediate), "weight"
        yield "output_norm.weight", (h,), "norm"

    def parameters(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in self.tensors())


def with_vocab(vocab: int) -> Config:
    """Qwen2.5-1.5B's shape for this vocabulary, with layers added if it falls short of 1.5B."""
    config = Config(vocab=vocab)
    while config.parameters() < MIN_PARAMS:
        config = Config(vocab=vocab, layers=config.layers + 1)
    return config


def tokenizer_fields(reader) -> list[tuple[str, object, object, object]]:
    """(key, value, type, array element type) of every tokenizer.* field of a GGUFReader."""
    from gguf import GGUFValueType

    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


def tensor_data(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, dtype=np.float32)
    if kind == "bias":
        return np.zeros(shape, dtype=np.float32)
    out = np.empty(shape, dtype=np.float16)
    for start in range(0, shape[0], ROWS_PER_DRAW):
        rows = out[start:start + ROWS_PER_DRAW]
        rows[...] = rng.standard_normal(rows.shape, dtype=np.float32) * STD
    return out


def write_f16(path: Path, config: Config, tokenizer_from: Path, seed: int = 0) -> None:
    """Streams the F16 GGUF to `path`: header, metadata and tensor infos, then one tensor at a time."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

    arch = "qwen2"
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"random {arch} {config.parameters() / 1e9:.2f}B (tokenwire bench)")
    writer.add_description(f"random normal weights (std {STD}, seed {seed}) in Qwen2.5-1.5B's shape; "
                           f"tokenizer from {tokenizer_from.name}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config.context)
    writer.add_embedding_length(config.hidden)
    writer.add_block_count(config.layers)
    writer.add_feed_forward_length(config.intermediate)
    writer.add_head_count(config.heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.rms_eps)
    reader = GGUFReader(str(tokenizer_from))
    for key, value, vtype, sub in tokenizer_fields(reader):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    del reader
    for name, shape, kind in config.tensors():
        dtype = np.float32 if kind != "weight" else np.float16
        raw = GGMLQuantizationType.F32 if kind != "weight" else GGMLQuantizationType.F16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, shape, kind in config.tensors():  # in the infos' order: write_tensor_data pops them in turn
        writer.write_tensor_data(tensor_data(shape, kind, rng))
    writer.close()


def quantize(f16: Path, out: Path, kind: str = "Q4_K_M", threads: int = 2) -> None:
    binary = PEERS_CACHE / "bin" / f"llama-quantize-{LLAMA_CPP_PYTHON_VERSION}-noamx"  # setup.sh's BUILD
    if not binary.exists():
        raise SystemExit(f"no llama-quantize at {binary}: run `bash bench/peers/setup.sh server`")
    tmp = out.with_name(out.name + ".part")
    proc = subprocess.run([str(binary), str(f16), str(tmp), kind, str(threads)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"llama-quantize failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    tmp.replace(out)


def default_tokenizer_source() -> Path:
    for path in TOKENIZER_SOURCES:
        if path.is_file():
            return path
    raise SystemExit("no GGUF to take a tokenizer from: run `tokenwire pull qwen2.5-coder-0.5b` (or make model), "
                     "or pass --tokenizer-from")


def vocab_size(path: Path) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=PEERS_CACHE / "gguf" / "random-qwen2-1.5b.Q4_K_M.gguf")
    parser.add_argument("--tokenizer-from", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-f16", action="store_true")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    if args.out.exists() and not args.force:
        print(args.out)
        return
    source = args.tokenizer_from or default_tokenizer_source()
    config = with_vocab(vocab_size(source))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    f16 = args.out.with_name(args.out.name.removesuffix(".gguf").removesuffix(".Q4_K_M") + ".F16.gguf")
    started = time.monotonic()
    if f16.exists() and not args.force:  # a finished F16 from a run that stopped before quantizing
        print(f"reusing {f16}", file=sys.stderr, flush=True)
    else:
        print(f"writing {f16} ({config.parameters() / 1e9:.3f}B parameters, {config.layers} layers, vocab "
              f"{config.vocab}, tokenizer from {source.name})", file=sys.stderr, flush=True)
        part = f16.with_name(f16.name + ".part")
        write_f16(part, config, source, args.seed)
        part.replace(f16)
    print(f"  {f16.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s; quantizing to Q4_K_M "
          "with llama-quantize", file=sys.stderr, flush=True)
    quantize(f16, args.out)
    if not args.keep_f16:
        f16.unlink()
    print(f"  {args.out.stat().st_size / 1e9:.2f} GB Q4_K_M in {time.monotonic() - started:.0f} s total",
          file=sys.stderr, flush=True)
    print(args.out)


if __name__ == "__main__":
    main()
