"""A decoder graph built for decoding: in-place KV, fused attention, int4/int8 weights.

From the weights of an optimum fp32 export of a llama-family model (llama, mistral, and
SmolLM2), emits the layout onnxruntime-genai's builder uses, in plain onnxruntime ops:

* `GroupQueryAttention` (com.microsoft) with rotary embedding inside it and the KV cache
  as one buffer per layer, [batch, kv_heads, capacity, head_dim], bound as both the past
  input and the present output, so each step writes only its new position in place
  (no concatenation, no copy of the cache, no repeat of KV heads);
* q/k/v fused into one MatMulNBits (packed QKV into GQA), gate/up fused into one;
* `SkipSimplifiedLayerNormalization` for residual add + RMSNorm;
* the lm_head (tied Q8_0) as 8-bit MatMulNBits, applied to the last position only;
* hidden states kept 2-D, [batch * sequence, hidden], between layers (reshaped to 3-D only
  around GroupQueryAttention), so each Q4_1 minimum correction and its addition is a single
  `Gemm` — a decode step at batch 1 is ~600 small kernels, and per-kernel overhead counts.

Two files from the same weights: `model.onnx` with onnxruntime's kernels (any device) and,
for CPUs with AVX2 or AVX-512, `model_native.onnx` where each linear is one node of tokenwire's
own `ai.tokenwire.Linear` op (server/native): Q4_1 blocks with their float minimum computed
exactly, activations rounded to int16 per block, no correction nodes; attention over an fp16
KV cache (`ai.tokenwire.Attention`).

Inputs: input_ids [B, S] int64, attention_mask [B, T] int64 (row b: ones for its tokens,
right-padded), past_key_values.N.key/value [B, kvh, capacity, hd]. Outputs: logits
[B, 1, V] (last position), present.N.key/value (the same buffers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tokenwire.server.engine import kv_int8
from tokenwire.server.engine.graph import GRAPH, NATIVE_GRAPH, kv_numpy_dtype, open_graph
from tokenwire.server.engine.model_config import ModelConfig

from .native_pack import DOMAIN as NATIVE_DOMAIN
from .native_pack import NativeEmitter
from .quantize import NBitsEmitter

SUPPORTED = ("llama", "mistral")


class FastGraphUnsupported(ValueError):
    pass


def _level_policy(name: str) -> int:
    # Every linear at accuracy level 0 (fp32 compute on the dequantized int4 blocks).
    # Level 4 (int8 activations) on gate/up is 15-30% faster, but its rounding turns the
    # ~1e-6 differences between onnxruntime's one-row and many-row kernels into different
    # tokens, so a sequence's output would depend on the batch it decodes in. Measured and
    # rejected; see the README's benchmark notes.
    return 0


KV_DTYPES = ("float32", "float16")
# The native graph's cache formats (the Attention op's kv_format): fp16, or int8 with scales
# (per channel over 16 positions for keys, per position for values; server/native/tw_kv8.c).
KV_FORMATS = ("float16", "int8")
NATIVE_KV_FORMAT = "float16"  # what pull builds (see the README's notes on where the time goes)


def native_unfit(config: ModelConfig) -> str:
    """Why the native kernels cannot run a model of this config.json ("" when they can)."""
    if config.model_type not in SUPPORTED or not config.heads:
        return f"no fast graph for model_type {config.model_type!r}"
    n_heads, kv_heads, head_dim, hidden = config.heads, config.kv_heads, config.head_dim, config.hidden_size
    if (head_dim % 16 or head_dim > 256 or n_heads % kv_heads or n_heads // kv_heads > 8
            or hidden % 32 or config.intermediate_size % 32):
        return ("the native kernels need head_dim a multiple of 16 up to 256, at most 8 query heads per "
                "KV head, and hidden/intermediate sizes multiples of 32")
    return ""


def build_fast_graph(
    fp32_dir: Path, out_dir: Path, bits: int = 4, level_for=_level_policy, last_only: bool = True,
    kv_dtype: str = "float32", native: bool = False, kv_format: str = NATIVE_KV_FORMAT,
) -> dict[str, int]:
    """Writes the fast graph; `last_only=False` keeps logits of every position (for evaluation).

    `native=True` writes NATIVE_GRAPH instead of GRAPH: every linear is one `ai.tokenwire.Linear`
    node (server/native_pack.py) in place of MatMulNBits and its correction, and attention is
    `ai.tokenwire.Attention` over an fp16 KV cache (half the bytes a long-context step reads;
    math in fp32); the rest is the same. `kv_format` ("float16" or "int8") is that cache's format.

    `kv_dtype="float16"` is the CUDA layout: onnxruntime's CUDA GroupQueryAttention takes
    fp16 only, so attention (and the KV buffers) run in fp16 between two Casts while the rest
    of the graph stays fp32. On CPU fp16 attention is slower than fp32 (measured: 75 vs 6 us
    a layer at 16 tokens of context), so the CPU layout keeps fp32.
    """
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format must be one of {KV_FORMATS}")
    half = kv_dtype == "float16"
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = ModelConfig.read(fp32_dir)
    config = shape.raw
    if shape.model_type not in SUPPORTED:
        raise FastGraphUnsupported(f"no fast graph for model_type {shape.model_type!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise FastGraphUnsupported("biases in attention/MLP are not supported by the fast graph")
    if config.get("rope_scaling"):
        raise FastGraphUnsupported("rope scaling is not supported by the fast graph")
    hidden, n_heads, kv_heads, head_dim = shape.hidden_size, shape.heads, shape.kv_heads, shape.head_dim
    layers = shape.layers
    eps = float(config.get("rms_norm_eps", 1e-6))
    theta = float(config.get("rope_theta", 10000.0))
    max_pos = shape.context_length

    if native and (why := native_unfit(shape)):
        raise FastGraphUnsupported(why)
    src = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=True)
    inits = {i.name: i for i in src.graph.initializer}
    produced_by = {out: node for node in src.graph.node for out in node.output}

    def weight_of(matmul_name: str) -> np.ndarray:
        node = next((n for n in src.graph.node if n.name == matmul_name), None)
        if node is None:
            raise FastGraphUnsupported(f"expected node {matmul_name} in the optimum graph")
        name = node.input[1]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        parent = produced_by.get(name)
        if parent is not None and parent.op_type == "Transpose" and parent.input[0] in inits:
            return numpy_helper.to_array(inits[parent.input[0]]).T
        raise FastGraphUnsupported(f"weight of {matmul_name} is not an initializer")

    def tensor(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    if native and half:
        raise ValueError("the native kernels are CPU kernels; the CUDA layout uses onnxruntime's")
    em = NativeEmitter() if native else NBitsEmitter(two_d=True)
    nodes = em.nodes
    extra_inits = []

    def init(array: np.ndarray, name: str) -> str:
        extra_inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", domain=domain, **attrs))

    padding: dict[int, tuple[str, str]] = {}

    def linear(x: str, w: np.ndarray, out: str, base: str, level: int, lm_head: bool = False) -> None:
        """x @ w; int8-activation linears (level 4) always see >= 2 rows.

        onnxruntime computes a single row (M = 1) at level 4 along another path than
        M >= 2 (logits differ by up to ~1.5), which would make a sequence's tokens depend
        on whether it decodes alone or in a batch. One zero row appended to the input keeps
        every call on the M >= 2 path; its output row is dropped.
        """
        if level != 4 or native:
            em.linear(x, w, out, base, bits, level, lm_head=lm_head)
            return
        k = w.shape[0]
        if k not in padding:
            padding[k] = (init(np.zeros((1, k), dtype=np.float32), f"zero_row_{k}"),
                          init(np.asarray([-1, k], dtype=np.int64), f"rows_shape_{k}"))
        zero, rows_shape = padding[k]
        node("Shape", [x], [f"{base}_xshape"])
        node("Reshape", [x, rows_shape], [f"{base}_x2d"])
        node("Concat", [f"{base}_x2d", zero], [f"{base}_xpad"], axis=0)
        em.linear(f"{base}_xpad", w, f"{base}_ypad", base, bits, level, lm_head=lm_head)
        node("Shape", [f"{base}_x2d"], [f"{base}_rows"], start=0, end=1)
        node("Slice", [f"{base}_ypad", "zero_i64", f"{base}_rows", "zero_i64"], [f"{base}_y2d"])
        node("Slice", [f"{base}_xshape", "zero_i64", "minus_one"], [f"{base}_lead"])
        node("Concat", [f"{base}_lead", init(np.asarray([w.shape[1]], dtype=np.int64), f"{base}_n")],
             [f"{base}_yshape"], axis=0)
        node("Reshape", [f"{base}_y2d", f"{base}_yshape"], [out])

    # Shared attention inputs: per-row lengths and the mask width.
    init(np.asarray([1], dtype=np.int64), "one")
    if not native:  # only the level-4 linears' padding slices with it
        init(np.asarray([0], dtype=np.int64), "zero_i64")
    init(np.asarray([-1], dtype=np.int64), "minus_one")
    node("ReduceSum", ["attention_mask", "one"], ["mask_rows"], keepdims=0)
    node("Sub", ["mask_rows", "one"], ["seqlens_k_i64"])
    node("Cast", ["seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32)
    if not native:  # GroupQueryAttention also takes the mask's width
        node("Shape", ["attention_mask"], ["mask_shape"])
        node("Gather", ["mask_shape", "one"], ["total_len_i64"], axis=0)
        node("Cast", ["total_len_i64"], ["total_len"], to=TensorProto.INT32)
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    attn_np = np.float16 if half else np.float32
    init(np.cos(freqs).astype(attn_np), "cos_cache")
    init(np.sin(freqs).astype(attn_np), "sin_cache")

    embed = tensor("model.embed_tokens.weight")
    init(embed, "embed_tokens")
    node("Gather", ["embed_tokens", "input_ids"], ["h0_3d"], axis=0)
    node("Reshape", ["h0_3d", init(np.asarray([-1, hidden], dtype=np.int64), "rows_hidden")], ["h0"])
    # [B, S] + trailing width: the 3-D shapes GroupQueryAttention and the logits need.
    node("Shape", ["input_ids"], ["ids_shape"])
    qkv_width = (n_heads + 2 * kv_heads) * head_dim
    node("Concat", ["ids_shape", init(np.asarray([qkv_width], dtype=np.int64), "qkv_width")], ["qkv_shape3"], axis=0)
    node("Concat", ["ids_shape", init(np.asarray([hidden], dtype=np.int64), "hidden_width")], ["hidden_shape3"],
         axis=0)
    attn_rows = init(np.asarray([-1, n_heads * head_dim], dtype=np.int64), "rows_attn")

    residual = "h0"
    norm_in = None
    for i in range(layers):
        p = f"/model/layers.{i}"
        ln1 = init(tensor(f"model.layers.{i}.input_layernorm.weight"), f"ln1_{i}")
        ln2 = init(tensor(f"model.layers.{i}.post_attention_layernorm.weight"), f"ln2_{i}")
        if norm_in is None:
            node("SimplifiedLayerNormalization", [residual, ln1], [f"x_{i}"], axis=-1, epsilon=eps)
        else:
            node("SkipSimplifiedLayerNormalization", [norm_in, residual, ln1],
                 [f"x_{i}", "", "", f"res_{i}"], domain="com.microsoft", epsilon=eps)
            residual = f"res_{i}"
        wq, wk, wv = (weight_of(f"{p}/self_attn/{n}_proj/MatMul") for n in ("q", "k", "v"))
        qkv = np.concatenate([wq, wk, wv], axis=1)
        linear(f"x_{i}", qkv, f"qkv_{i}", f"l{i}_qkv", level_for(f"l{i}_qkv"))
        node("Reshape", [f"qkv_{i}", "qkv_shape3"], [f"qkv3_{i}" + ("_f32" if half else "")])
        if half:
            node("Cast", [f"qkv3_{i}_f32"], [f"qkv3_{i}"], to=TensorProto.FLOAT16)
        if native:
            node("Attention",
                 [f"qkv3_{i}", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
                  "cos_cache", "sin_cache", "kv_pages"],
                 [f"attn3_{i}", f"present.{i}.key", f"present.{i}.value"],
                 domain=NATIVE_DOMAIN, num_heads=n_heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5),
                 kv_format=kv_format)
        else:
            node("GroupQueryAttention",
                 [f"qkv3_{i}", "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                  "seqlens_k", "total_len", "cos_cache", "sin_cache"],
                 [f"attn3_{i}" + ("_f16" if half else ""), f"present.{i}.key", f"present.{i}.value"],
                 domain="com.microsoft", num_heads=n_heads, kv_num_heads=kv_heads, do_rotary=1,
                 rotary_interleaved=0, scale=float(head_dim ** -0.5))
        if half:
            node("Cast", [f"attn3_{i}_f16"], [f"attn3_{i}"], to=TensorProto.FLOAT)
        node("Reshape", [f"attn3_{i}", attn_rows], [f"attn_{i}"])
        linear(f"attn_{i}", weight_of(f"{p}/self_attn/o_proj/MatMul"), f"o_{i}", f"l{i}_o", level_for(f"l{i}_o"))
        node("SkipSimplifiedLayerNormalization", [f"o_{i}", residual, ln2],
             [f"y_{i}", "", "", f"res2_{i}"], domain="com.microsoft", epsilon=eps)
        residual = f"res2_{i}"
        gate, up = weight_of(f"{p}/mlp/gate_proj/MatMul"), weight_of(f"{p}/mlp/up_proj/MatMul")
        inter = gate.shape[1]
        linear(f"y_{i}", np.concatenate([gate, up], axis=1), f"gu_{i}", f"l{i}_gate_up", level_for(f"l{i}_gate_up"))
        node("Split", [f"gu_{i}", init(np.asarray([inter, inter], dtype=np.int64), f"split_{i}")],
             [f"g_{i}", f"u_{i}"], axis=-1)
        node("Sigmoid", [f"g_{i}"], [f"gs_{i}"])
        node("Mul", [f"g_{i}", f"gs_{i}"], [f"silu_{i}"])
        node("Mul", [f"silu_{i}", f"u_{i}"], [f"act_{i}"])
        linear(f"act_{i}", weight_of(f"{p}/mlp/down_proj/MatMul"), f"down_{i}", f"l{i}_down",
               level_for(f"l{i}_down"))
        norm_in = f"down_{i}"

    # Back to [B, S, H]; last position only: [B, 1, H].
    init(np.asarray([np.iinfo(np.int64).max], dtype=np.int64), "int_max")
    node("Reshape", [norm_in, "hidden_shape3"], ["down_3d"])
    node("Reshape", [residual, "hidden_shape3"], ["res_3d"])
    if last_only:
        node("Slice", ["down_3d", "minus_one", "int_max", "one"], ["down_last"])
        node("Slice", ["res_3d", "minus_one", "int_max", "one"], ["res_last"])
    else:
        node("Identity", ["down_3d"], ["down_last"])
        node("Identity", ["res_3d"], ["res_last"])
    final = init(tensor("model.norm.weight"), "final_norm")
    node("SkipSimplifiedLayerNormalization", ["down_last", "res_last", final],
         ["hidden_last"], domain="com.microsoft", epsilon=eps)
    head = weight_of(next(n.name for n in src.graph.node if "logits" in n.output))
    linear("hidden_last", head, "logits", "lm_head", 4, lm_head=True)

    # The native graph's cache is a pool of pages ([pages, kv_heads, page size, head_dim]) with a
    # page table per row (kv_pages); onnxruntime's GroupQueryAttention needs a dense row each.
    int8 = native and kv_format == "int8"
    row = kv_int8.row_bytes(head_dim) if int8 else head_dim  # an int8 row: codes + its share of scales
    kv_shape = ["kv_pages_total", kv_heads, "page_size", row] if native else ["batch_size", kv_heads, "capacity",
                                                                             head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if native:
        inputs.append(helper.make_tensor_value_info("kv_pages", TensorProto.INT32, ["batch_size", "pages_per_row"]))
    logits_len = 1 if last_only else "sequence_length"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", logits_len, head.shape[1]])]
    for i in range(layers):
        for kind in ("key", "value"):
            kv_type = TensorProto.UINT8 if int8 else TensorProto.FLOAT16 if half or native else TensorProto.FLOAT
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, kv_shape))
    graph = helper.make_graph(nodes, "tokenwire_fast_decoder", inputs, outputs, initializer=em.inits + extra_inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    if native:
        opsets.append(helper.make_opsetid(NATIVE_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    out_dir.mkdir(parents=True, exist_ok=True)
    name = NATIVE_GRAPH if native else GRAPH
    onnx.save_model(model, str(out_dir / name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        if (fp32_dir / name).is_file():
            shutil.copy2(fp32_dir / name, out_dir / name)
    return em.routes


def full_logits(model_dir: Path, tokens: list[int], native: bool = False) -> np.ndarray:
    """Logits [len, vocab] of every position of a `last_only=False` fast graph, one pass."""
    import onnxruntime as ort

    session = open_graph(model_dir, native)
    config = ModelConfig.read(model_dir)
    io = session.io_binding()
    io.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
    io.bind_cpu_input("attention_mask", np.ones((1, len(tokens)), dtype=np.int64))
    capacity = len(tokens)
    if any(i.name == "kv_pages" for i in session.get_inputs()):  # one page holding the whole text
        capacity = -(-len(tokens) // 16) * 16
        io.bind_cpu_input("kv_pages", np.zeros((1, 1), dtype=np.int32))
    dtype = kv_numpy_dtype(session)
    row = kv_int8.row_bytes(config.head_dim) if dtype == np.uint8 else config.head_dim
    for i in range(config.layers):
        for kind in ("key", "value"):
            zeros = np.zeros((1, config.kv_heads, capacity, row), dtype)
            value = ort.OrtValue.ortvalue_from_numpy(zeros)
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
            io.bind_ortvalue_output(f"present.{i}.{kind}", value)
    io.bind_output("logits")
    session.run_with_iobinding(io)
    return io.get_outputs()[-1].numpy()[0]  # logits was bound last
