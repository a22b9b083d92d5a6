"""Rebuilds a plain transformers folder (float32 safetensors, config, tokenizer) from a GGUF.

Runs in the peers venv (transformers 5.x), for onnxruntime-genai's builder, which reads a
transformers folder (its GGUF input takes float16/float32 files only). transformers 5.x loads the
Q4_1 GGUF (dequantized) but refuses to save the gguf-quantized model, so the weights move into a
fresh model made from the same config.

    .venv-peers/bin/python bench/peers/gguf_to_hf.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} ({config.architectures[0]}, {sum(p.numel() for p in plain.parameters())} parameters)")


if __name__ == "__main__":
    main()
