"""`tokenwire import FILE.gguf`: a GGUF's own blocks in the native graph, served by PagedEngine.

Tiny random GGUFs of every architecture (tests/gguf_fixtures.py), imported through
importer.import_gguf, then decoded by the real PagedEngine two ways — every prefix prefilled
from nothing, and one prefill followed by a decode step a token — and compared position by
position with server/build/gguf_reference.py's float forward of the same file (numpy, written
independently from transformers' conventions and checked against transformers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
from conftest import cli
from gguf_fixtures import gguf_fixture, hf_fixture, llama3_rope_factors

from tokenwire.server.build import gguf_graph, importer
from tokenwire.server.build.gguf_model import Rope
from tokenwire.server.build.gguf_reference import reference_logits
from tokenwire.server.build.gguf_rope import frequencies
from tokenwire.server.build.importer import ImportRefused, import_gguf, import_model
from tokenwire.server.engine.graph import NATIVE_GRAPH
from tokenwire.server.engine.paged_engine import PagedEngine
from tokenwire.server.models.store import ModelStore

TOKENS = [int(t) for t in np.random.default_rng(3).integers(3, 384, 24)]
# A Q4_K_M file's mix: Q4_K linears, Q6_K down projections and lm_head, Q5_0 and Q8_0 for some
# roles, F32 norms (and biases); attn_v differs from attn_q/attn_k, so q/k/v cannot fuse.
MIXED = {"linear": "Q4_K", "ffn_down": "Q6_K", "attn_v": "Q5_0", "token_embd": "Q8_0", "output": "Q6_K"}
# A logit may move this much from the float reference: fp16 KV, int16-rounded activations.
LOGIT_TOLERANCE = 0.05


def _store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _contents(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir()) if store.root.is_dir() else []


def decode_both_ways(folder: Path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """([T, V] from prefilling each prefix anew, [T, V] from one prefill then a step a token)."""
    engine = PagedEngine(folder, threads=1)
    fresh = []
    for t in range(1, len(tokens) + 1):
        engine.reset()
        state = engine.new_prefill()
        fresh.append(np.array(engine.prefill(state, tokens[:t])))
        engine.end_prefill(state)
    engine.reset()
    state = engine.new_prefill()
    cached = [np.array(engine.prefill(state, tokens[:1]))]
    engine.join(state)
    for token in tokens[1:]:
        cached.append(np.array(engine.step([token])[0]))
    engine.reset()
    return np.stack(fresh), np.stack(cached)


def assert_close_to(reference: np.ndarray, got: np.ndarray, what: str) -> None:
    diff = float(np.abs(got - reference).max())
    assert diff <= LOGIT_TOLERANCE, f"{what}: max |dlogit| {diff:.4f} (logits up to {np.abs(reference).max():.1f})"
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff  # a tie within the difference may go either way
    agree = got.argmax(-1) == reference.argmax(-1)
    assert agree[decided].all(), f"{what}: top-1 differs at positions {np.flatnonzero(~agree).tolist()}"
    assert decided.mean() > 0.9


def import_and_compare(path: Path, tmp_path: Path, name: str) -> Path:
    result = import_gguf(path, _store(tmp_path), name=name, progress=lambda _: None, check=False)
    reference = reference_logits(path, TOKENS)
    fresh, cached = decode_both_ways(result.folder, TOKENS)
    assert_close_to(reference, fresh, f"{name} prefilled")
    assert_close_to(reference, cached, f"{name} decoded a token at a time")
    return result.folder


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_each_architecture_decodes_as_the_reference(arch: str, tmp_path: Path) -> None:
    folder = import_and_compare(gguf_fixture(arch, qtypes=MIXED), tmp_path, f"tiny-{arch}")
    manifest = json.loads((folder / "tokenwire.json").read_text())
    assert manifest["precision"] == "gguf:Q4_K_M" and manifest["id"] == f"tiny-{arch}:q4_k_m"
    assert manifest["kernels"]["native"]["kv_layout"] == "paged"
    assert not (folder / "model.onnx").exists() and (folder / NATIVE_GRAPH).is_file()


ROPE_VARIANTS = {
    "llama3-factors": ("llama", {"rope_factors": llama3_rope_factors(64, 10000.0, factor=8.0, original_context=64)}),
    "llama-partial": ("llama", {"rope_dims": 32}),  # interleaved pairs on half the dims, the rest passing
    "phi3-partial": ("phi3", {"rope_dims": 48}),
    "gemma3-linear": ("gemma3", {"rope_scale": 8.0}),  # the global layers' positions / 8, local ones not
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_variants_decode_as_the_reference(variant: str, tmp_path: Path) -> None:
    arch, overrides = ROPE_VARIANTS[variant]
    import_and_compare(gguf_fixture(arch, qtypes={"linear": "Q8_0"}, **overrides), tmp_path, variant)


def test_yarn_and_linear_frequencies_equal_transformers() -> None:
    """gguf_rope's angles and magnitude for YaRN and linear scaling, against transformers' rope
    initialisers on the same parameters (what llama.cpp computes in ggml's rope_yarn)."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling, extra in (("yarn", {"original_max_position_embeddings": 4096}), ("linear", {})):
        config = PretrainedConfig(rope_theta=1e6, hidden_size=512, num_attention_heads=8, head_dim=64,
                                  max_position_embeddings=16384,
                                  rope_scaling={"rope_type": scaling, "factor": 4.0, **extra})
        inv_freq, attention = ROPE_INIT_FUNCTIONS[scaling](config, "cpu")
        ours, mscale = frequencies(Rope(base=1e6, dims=64, interleaved=False, scaling=scaling, factor=4.0,
                                        original_context=4096))
        np.testing.assert_allclose(ours, inv_freq.double().numpy(), rtol=1e-6)
        assert mscale == pytest.approx(attention, rel=1e-6)


def test_mixed_types_are_packed_as_the_file_has_them(tmp_path: Path) -> None:
    path = gguf_fixture("llama", qtypes={**MIXED, "ffn_up": "Q8_0"})
    folder = import_gguf(path, _store(tmp_path), name="mixed", progress=lambda _: None, check=False).folder
    facts = json.loads((folder / "tokenwire.json").read_text())["gguf"]
    assert set(facts["tensor_types"]) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    # The packed weights are the file's bytes re-laid (a little more for K-quants' scales).
    assert facts["tensor_bytes"] <= facts["packed_bytes"] <= 1.15 * facts["tensor_bytes"]
    graph = onnx.load(str(folder / NATIVE_GRAPH), load_external_data=False)
    ops = [n.op_type for n in graph.graph.node]
    # attn_v's Q5_0 differs from attn_q/k's Q4_K: three BlockLinears and a Concat per block;
    # ffn_gate (Q4_K) and ffn_up (Q8_0) differ too: two. Per block 3 + 1 + 2 + 1, plus the lm_head.
    assert ops.count("BlockLinear") == 2 * 7 + 1 and ops.count("BlockGather") == 1
    assert facts["fused"] == {}
    fresh, cached = decode_both_ways(folder, TOKENS)
    reference = reference_logits(path, TOKENS)
    assert_close_to(reference, fresh, "mixed prefilled")
    assert_close_to(reference, cached, "mixed decoded")


def test_the_other_types_too(tmp_path: Path) -> None:
    """Q4_0, Q4_1, Q5_1, Q5_K, BF16 and F16 weights (the types MIXED does not cover)."""
    qtypes = {"linear": "Q4_0", "attn_q": "Q4_1", "ffn_up": "Q5_1", "ffn_gate": "Q5_K", "ffn_down": "BF16",
              "token_embd": "F16", "output": "Q5_K"}
    folder = import_and_compare(gguf_fixture("qwen2", tied=False, qtypes=qtypes), tmp_path, "other-types")
    types = json.loads((folder / "tokenwire.json").read_text())["gguf"]["tensor_types"]
    assert set(types) == {"Q4_0", "Q4_1", "Q5_1", "Q5_K", "BF16", "F16"}


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_output(tied: bool, tmp_path: Path) -> None:
    path = gguf_fixture("llama", tied=tied, qtypes={"linear": "Q4_K", "token_embd": "Q6_K", "output": "Q8_0"})
    folder = import_and_compare(path, tmp_path, f"tied-{tied}")
    graph = onnx.load(str(folder / NATIVE_GRAPH), load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "BlockGather")
    head = next(n for n in graph.node if n.op_type == "BlockLinear" and n.output[0].startswith("logits"))
    # Tied: the lm_head reads the embedding's own packed blocks (one copy); untied: output.weight's.
    assert (list(head.input[1:]) == list(gather.input[1:])) is tied
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied


def test_llama_qk_rows_are_unpermuted_exactly(tmp_path: Path, monkeypatch) -> None:
    """A transformers llama written as convert_hf_to_gguf.py writes it (Q/K rows permuted for
    interleaved rope): the imported graph gives transformers' own logits; without the
    un-permutation it does not (so this test can fail)."""
    fixture = hf_fixture("llama", qtypes={"linear": "Q8_0"}, tie_word_embeddings=False)
    truth = fixture.logits(TOKENS)
    folder = import_gguf(fixture.path, _store(tmp_path), name="hf-llama", progress=lambda _: None, check=False).folder
    fresh, cached = decode_both_ways(folder, TOKENS)
    assert_close_to(truth, fresh, "llama vs transformers")
    assert_close_to(truth, cached, "llama vs transformers, decoded")

    monkeypatch.setattr(gguf_graph, "rows_order", lambda rope, head_dim, heads: None)
    wrong = import_gguf(fixture.path, _store(tmp_path), name="hf-llama-permuted", progress=lambda _: None, check=False).folder
    fresh_wrong, _ = decode_both_ways(wrong, TOKENS[:8])
    assert np.abs(fresh_wrong - truth[:8]).max() > 1.0


def test_an_unsupported_quant_type_is_refused_with_its_name(tmp_path: Path, monkeypatch) -> None:
    path = gguf_fixture("llama", qtypes={"linear": "Q4_K", "ffn_down": "Q2_K"})
    store = _store(tmp_path)
    with pytest.raises(ImportRefused, match=r"Q2_K is not supported \(tensor blk\.0\.ffn_down\.weight\)"):
        import_gguf(path, store, fallback=False, check=False, progress=lambda _: None)
    assert _contents(store) == []

    # With the fallback (the default) it goes to transformers, saying why, unless that would not fit.
    calls, said = [], []
    monkeypatch.setattr(importer, "import_model", lambda *a, **k: calls.append(k) or "converted")
    monkeypatch.setattr(importer, "available_memory", lambda: 64 << 30)
    assert import_gguf(path, store, progress=said.append) == "converted"
    assert calls[0]["transformers"] is True and "Q2_K is not supported" in said[0]
    monkeypatch.setattr(importer, "available_memory", lambda: 1 << 20)
    with pytest.raises(ImportRefused, match=r"transformers route would need about .* GiB of memory"):
        import_gguf(path, store, progress=said.append)
    assert len(calls) == 1


def _stub_gguf(path: Path, arch: str, **keys: int) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    for key, value in keys.items():
        writer.add_uint16(key.replace("_", "."), value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_architecture_falls_back_with_the_reason(tmp_path: Path, monkeypatch) -> None:
    path = _stub_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    said: list[str] = []
    monkeypatch.setattr(importer, "import_model", lambda *a, **k: "converted")
    assert import_gguf(path, _store(tmp_path), progress=said.append) == "converted"
    assert "architecture 'gpt2' is not supported by the native graph" in said[0]
    # One part of a split file has half a model: refused, not converted.
    split = _stub_gguf(tmp_path / "m-00001-of-00002.gguf", "llama", split_count=2)
    with pytest.raises(ImportRefused, match="one of 2 parts of a split GGUF"):
        import_gguf(split, _store(tmp_path), progress=said.append)


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_a_damaged_file_is_refused_and_the_store_is_unchanged(damage: str, tmp_path: Path) -> None:
    store = _store(tmp_path)
    good = import_gguf(gguf_fixture("qwen2"), store, name="good", progress=lambda _: None, check=False)
    before = _contents(store)
    data = gguf_fixture("qwen2").read_bytes()
    broken = tmp_path / "broken.gguf"
    if damage == "truncated":
        broken.write_bytes(data[: len(data) * 2 // 3])
        expected = r"truncated: tensor .* ends at byte"
    elif damage == "garbage header":
        broken.write_bytes(data[:24] + b"\xff" * 200 + data[224:])
        expected = r"truncated or damaged|unknown"
    else:
        broken.write_bytes(b"")
        expected = "GGUF magic"
    with pytest.raises(ImportRefused, match=expected):
        import_model(broken, store, name="broken")
    assert _contents(store) == before and store.get(good.model_id).error == ""


def test_the_folder_links_its_source_and_rm_keeps_the_file(tmp_path: Path) -> None:
    src = tmp_path / "Mine-F32.gguf"
    shutil.copy(gguf_fixture("qwen3"), src)
    store = _store(tmp_path)
    result = import_gguf(src, store, progress=lambda _: None, check=False)
    assert result.model_id == "mine:f32"  # the file's name without its file type, then the type
    link = result.folder / importer.GGUF_SOURCE_LINK
    assert link.is_symlink() and link.resolve() == src.resolve()
    assert result.size_bytes < src.stat().st_size * 2  # the link is not counted as the folder's
    store.remove(result.model_id)
    assert not result.folder.exists() and src.is_file() and src.stat().st_size > 0


def test_cli_import_of_a_gguf(tmp_path: Path) -> None:
    import subprocess

    path = gguf_fixture("qwen2", qtypes={"linear": "Q8_0"})
    models = tmp_path / "models"
    proc = subprocess.run(cli("import", str(path), "--name", "cli-qwen", "--no-check", "--models-dir", str(models)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported cli-qwen:q8_0 (gguf" in proc.stdout and "gguf:Q8_0" in proc.stdout
    with pytest.raises(ImportRefused, match="already in the store"):
        import_gguf(path, ModelStore(models), name="cli-qwen", check=False, progress=lambda _: None)
