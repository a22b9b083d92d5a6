"""Makes tiny randomly initialised decoder models and exports them with optimum.

Used by the generality tests (and handy by hand): every architecture here must load in
our engine as optimum exports it, with no per-model code.

    python tests/tiny_models.py OUT_DIR [llama qwen2 gpt2 ...]

Each model gets a folder OUT_DIR/tiny-<arch> holding the optimum export and a manifest,
i.e. a ready model-store entry with id `tiny-<arch>:fp32`. Needs the `export` extra.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ARCHS = ("llama", "qwen2", "gpt2")


def _config(arch: str, vocab: int):
    from transformers import AutoConfig

    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    return AutoConfig.for_model(
        arch,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )


def make_tiny_checkpoint(arch: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> int:
    """Saves a tiny random-init transformers checkpoint (with the tokenizer) into out_dir;
    returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = _tokenizer_vocab(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(_config(arch, vocab))
    # Random init gives near-uniform logits; widen them so greedy choices are not ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    return sum(p.numel() for p in model.parameters())


def make_tiny(arch: str, out_root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Builds `tiny-<arch>` into out_root (skipped when it is already there)."""
    from tokenwire.server.build.pull import export_onnx, write_model_manifest

    model_id = f"tiny-{arch}:fp32"
    folder = out_root / f"tiny-{arch}_fp32"
    if (folder / "tokenwire.json").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        params = make_tiny_checkpoint(arch, checkpoint, tokenizer_dir, seed)
        staging = Path(tmp) / "onnx"
        export_onnx(checkpoint, staging)
        write_model_manifest(staging, model_id, {"random_init": arch, "seed": seed}, "fp32", params)
        out_root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, folder)
    return folder


def _tokenizer_vocab(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


if __name__ == "__main__":
    from tokenwire.server.models.store import ModelStore

    out = Path(sys.argv[1])
    tok_dir = ModelStore().get("smollm2-135m:fp32").path
    for arch in sys.argv[2:] or ARCHS:
        print(make_tiny(arch, out, tok_dir))
