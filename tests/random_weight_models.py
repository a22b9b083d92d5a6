"""The default model's shape with random weights, built from config.json and the tokenizer alone.

For machines that cannot fetch the default model (the GPU machine reaches no registry, and the
weights do not fit in what travels with the tree): `bench/gpu/smollm2-135m-config/` holds
SmolLM2-135M's config.json and tokenizer files, and this module makes weights of that shape
with numpy, lying on the GGUF grids the real model's weights lie on (Q4_1 linears, a Q8_0
lm_head), so `build_fast_graph` carries them over exactly as `tokenwire pull` does and emits
the graph the default model serves with: the same nodes, kernels and sizes (model.onnx.data is
byte for byte as large). No torch, transformers or optimum is needed.

    python tests/random_weight_models.py OUT_STORE [--layouts cuda,cpu] [--default cuda] [--seed 0]

writes a model store with `random-smollm2-135m:cuda` (the CUDA layout: fp16 KV cache) and
`random-smollm2-135m:cpu` (the CPU layout: fp32 KV cache), both from the same weights, with the
alias `random-smollm2-135m` (and `default`) naming the `--default` one.

The weights are random but scaled (see EMBED_STD) so that greedy choices have margins: near-ties
would make any comparison of two numerics (fp16 against fp32 KV) a coin toss.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "bench" / "gpu" / "smollm2-135m-config"
NAME = "random-smollm2-135m"
# layout -> the fast graph's KV dtype (server/build/pull.py kv_dtype_for)
LAYOUTS = {"cuda": "float16", "cpu": "float32"}
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")
BLOCK = 32

# Standard deviations of the random weights. The embedding carries the residual stream (rms 1),
# each of the 30 layers adds a small update (so the network is far from chaotic and an fp16
# rounding stays an fp16 rounding at the logits), and the untied lm_head spreads logits to std ~3.
# Measured on this CPU, teacher-forced over 400 tokens, fp16 KV against fp32 KV: top-1 agreement
# 100%, and under 1% of positions would flip even with 8x that noise; the context changes the
# top-1 token of 93% of positions (attention decides).
EMBED_STD = 1.0
LINEAR_STD = 0.015
HEAD_STD = 0.1


def model_id(layout: str) -> str:
    return f"{NAME}:{layout}"


def q4_1_weight(rng: np.random.Generator, k: int, n: int, std: float) -> np.ndarray:
    """[K, N] (x @ W layout) on llama.cpp's Q4_1 grid: blocks of 32 along K, w = q*d + m, codes
    0..15 with 0 and 15 in every block (so the block's min and max recover d and m exactly)."""
    kb = k // BLOCK
    codes = rng.integers(0, 16, size=(n, kb, BLOCK), dtype=np.uint8)
    lo_at = rng.integers(0, BLOCK, size=(n, kb, 1))
    hi_at = (lo_at + 1 + rng.integers(0, BLOCK - 1, size=(n, kb, 1))) % BLOCK
    np.put_along_axis(codes, lo_at, 0, axis=-1)
    np.put_along_axis(codes, hi_at, 15, axis=-1)
    # codes uniform on 0..15 have std ~4.6: d sets the spread, m centres the block near 0.
    d = (std / 4.6 * rng.uniform(0.5, 1.5, size=(n, kb, 1))).astype(np.float32)
    m = (-7.5 * d + std * 0.1 * rng.standard_normal((n, kb, 1))).astype(np.float32)
    w = codes.astype(np.float32) * d + m  # [N, kb, 32]
    return np.ascontiguousarray(w.reshape(n, k).T)


def q8_0_rows(rng: np.random.Generator, rows: int, k: int, std: float) -> np.ndarray:
    """[rows, K] on llama.cpp's Q8_0 grid along K: x = q*d, |q| <= 127 with 127 in every block."""
    kb = k // BLOCK
    q = np.clip(np.rint(rng.standard_normal((rows, kb, BLOCK)) * 40), -127, 127).astype(np.float32)
    at = rng.integers(0, BLOCK, size=(rows, kb, 1))
    np.put_along_axis(q, at, np.where(rng.random((rows, kb, 1)) < 0.5, -127.0, 127.0), axis=-1)
    d = (std / 40 * rng.uniform(0.5, 1.5, size=(rows, kb, 1))).astype(np.float32)
    return (q * d).reshape(rows, k)


def write_source_graph(config_dir: Path, out_dir: Path, seed: int = 0) -> int:
    """Writes `out_dir/model.onnx` holding the weights under optimum's names (what
    build_fast_graph reads: MatMul nodes by name, norms and embedding by initializer, the
    lm_head as the MatMul that makes `logits`), plus the config and
    tokenizer files. Not a runnable graph: a weight container. Returns the parameter count
    (the untied lm_head included, so ~28M more than the real, tied model's)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tokenwire.server.engine.model_config import ModelConfig

    shape = ModelConfig.read(config_dir)
    hidden, inter, layers = shape.hidden_size, shape.intermediate_size, shape.layers
    q_width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    params = 0

    def add(name: str, array: np.ndarray) -> str:
        nonlocal params
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        params += array.size
        return name

    def matmul(node_name: str, k: int, n: int) -> None:
        weight = add(node_name.strip("/").replace("/", ".") + ".weight", q4_1_weight(rng, k, n, LINEAR_STD))
        nodes.append(helper.make_node("MatMul", ["x", weight], [node_name + "_out"], name=node_name))

    add("model.embed_tokens.weight", q8_0_rows(rng, shape.vocab_size, hidden, EMBED_STD))
    for i in range(layers):
        p = f"/model/layers.{i}"
        add(f"model.layers.{i}.input_layernorm.weight", np.ones(hidden, np.float32))
        add(f"model.layers.{i}.post_attention_layernorm.weight", np.ones(hidden, np.float32))
        for proj, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            matmul(f"{p}/self_attn/{proj}_proj/MatMul", hidden, width)
        matmul(f"{p}/self_attn/o_proj/MatMul", q_width, hidden)
        matmul(f"{p}/mlp/gate_proj/MatMul", hidden, inter)
        matmul(f"{p}/mlp/up_proj/MatMul", hidden, inter)
        matmul(f"{p}/mlp/down_proj/MatMul", inter, hidden)
    add("model.norm.weight", np.ones(hidden, np.float32))
    # Untied (SmolLM2 ties them): a tied head would make every token predict itself.
    add("lm_head.weight", q8_0_rows(rng, shape.vocab_size, hidden, HEAD_STD).T)
    nodes.append(helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(
        nodes, "random_weights", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", hidden])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", shape.vocab_size])], initializer=inits)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out_dir / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    for name in FILES:
        if (config_dir / name).is_file():
            shutil.copy2(config_dir / name, out_dir / name)
        elif (config_dir / f"{name}.gz").is_file():  # tokenizer.json travels gzipped (3.5 MB -> 0.6 MB)
            with gzip.open(config_dir / f"{name}.gz", "rb") as packed, open(out_dir / name, "wb") as out:
                shutil.copyfileobj(packed, out)
    return params


def build_store(root: Path, config_dir: Path = CONFIG_DIR, layouts: tuple[str, ...] = ("cuda", "cpu"),
                default: str = "cuda", seed: int = 0, progress=print) -> dict[str, Path]:
    """A model store at `root` with one folder per layout (the same weights); returns layout -> folder.
    Instant when the store already holds them (same seed)."""
    from tokenwire.server.build.fast_graph import build_fast_graph
    from tokenwire.server.build.pull import write_model_manifest
    from tokenwire.server.models.store import ModelStore, folder_name

    root = Path(root)
    store = ModelStore(root)
    folders = {layout: root / folder_name(model_id(layout)) for layout in layouts}
    source = {"random_init": "smollm2-135m shape", "seed": seed, "config": "bench/gpu/smollm2-135m-config",
              "std": {"embed": EMBED_STD, "linear": LINEAR_STD, "lm_head": HEAD_STD}}

    def current(folder: Path) -> bool:
        try:
            return json.loads((folder / "tokenwire.json").read_text()).get("source") == source
        except (OSError, ValueError):
            return False

    todo = [layout for layout, folder in folders.items() if not current(folder)]
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        work = root / ".random-source"
        started = time.monotonic()
        params = write_source_graph(config_dir, work, seed)
        progress(f"random weights ({params / 1e6:.1f}M parameters, seed {seed}): {time.monotonic() - started:.1f}s")
        for layout in todo:
            started = time.monotonic()
            kv_dtype = LAYOUTS[layout]
            tmp = root / f".build-{layout}"
            shutil.rmtree(tmp, ignore_errors=True)
            routes = build_fast_graph(work, tmp, bits=4, kv_dtype=kv_dtype)
            write_model_manifest(tmp, model_id(layout), source, "int4", params, {
                "graph": "gqa", "kv_dtype": kv_dtype,
                "quantization": {"routes": routes, "accuracy_levels": "linears 0, lm_head 8-bit at 4"}})
            shutil.rmtree(folders[layout], ignore_errors=True)
            tmp.replace(folders[layout])
            progress(f"{model_id(layout)} (KV {kv_dtype}, routes {routes}): {time.monotonic() - started:.1f}s")
        shutil.rmtree(work, ignore_errors=True)
    if default in folders:
        store.set_alias(NAME, model_id(default))
        store.set_alias("default", NAME)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the model store to write")
    parser.add_argument("--layouts", default="cuda,cpu", help="comma-separated: cuda (fp16 KV), cpu (fp32 KV)")
    parser.add_argument("--default", default="cuda", help="the layout the alias and `default` name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR)
    args = parser.parse_args(argv)
    layouts = tuple(x for x in args.layouts.split(",") if x)
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        sys.exit(f"unknown layouts {sorted(unknown)}: choose from {sorted(LAYOUTS)}")
    for layout, folder in build_store(args.out, args.config_dir, layouts, args.default, args.seed).items():
        print(f"{layout}: {folder}")


if __name__ == "__main__":
    main()
