"""Records llama.cpp's tokenization of fixed texts for GGUF vocabularies: tests/data/gguf_tokens.json.

tests/build/test_gguf_tokenizer.py checks server/build/gguf_tokenizer.py against what this writes.
It runs llama-cpp-python (`llama_cpp.Llama(path, vocab_only=True).tokenize(text, add_bos, special)`),
so it runs in the peers' venv, which bench/peers/setup.sh builds (`bash bench/peers/setup.sh venv`):

    .venv-peers/bin/python tools/record_gguf_tokens.py --fixtures [FILE.gguf ...]

--fixtures records the small vocabularies tests/gguf_vocab_fixtures.py writes (the fast tier's);
each FILE is recorded under its file name (the tests look for it in the model store's .cache/ or
in $TOKENWIRE_GGUF_DIRS). Entries of other files already in the JSON are kept, so files on
different machines can be recorded in turn. Per file: the sha256 of its tokenizer metadata (the
tests check they rebuild the same vocabulary), llama.cpp's BOS/EOS, add_bos/add_eos and
end-of-generation ids, and for every text the ids in three modes: special tokens parsed
(`special`), that with add_bos=True (`bos+special`: BOS/EOS as the file asks) and special tokens
read as text (`plain`), the last two only where they differ from `special`. No vocabulary is stored.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "gguf_tokens.json"

TEXTS: dict[str, str] = {
    "prose": "The capital of France is Paris. It's a city of 2,165,423 people; they've been there "
             "since the 3rd century BC, haven't they? I'M SURE YOU'LL SEE.",
    "emoji": "I ❤️ tokenizers 🤖🚀! Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin tones 👋🏽, and ✅✔︎☑.",
    "cjk": "你好，世界！今天天气很好。日本語のテキスト、カタカナとひらがな。한국어 텍스트도 있습니다.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n  # base case\n"
            "\treturn fib(n-1) + fib(n-2)\n\nprint(f\"{fib(10)=}\")  // x != y && a->b || c::d\n"
            "    }}]);\r\n<div class=\"x\">&amp;</div>",
    "accents": "Ça va? Élève naïve au café, Straße, Ægir, ÀÉcole aÉ, İstanbul, Ωmega, ñandú, "
               "Ελληνικά, Привет мир, مرحبا بالعالم, שלום, नमस्ते, ไทย, e\u0301 (combining).",
    "whitespace": "  two leading,   three inside,\ttab,\t\ttwo tabs,\n\nblank line,\n\n\n\nfour,"
                  " nbsp\u00a0here, ideographic\u3000space, trailing   \n   \n  ",
    "digits": "0 1 12 123 1234 12345 123456 1234567 3.14159 -42 1e-9 0x1F ١٢٣ ½ ²³ 2024-12-01 "
              "12:30 $1,000.00 99% 10^6",
    "specials": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n<think>x</think><tool_call>{}<|endoftext|><start_of_turn>user\n"
                "hey<end_of_turn>\n<s>[INST] a </s><bos><eos><|eot_id|><|fim_pad|><table><unk>",
    "lookalikes": "<0x41> <0x0A>literal, ▁ and ▁▁ (U+2581), <|im_start, im_end|>, <|, |>, < s >, <</s>>",
    "camel": "camelCaseName = getHTTPResponse(); XMLHttpRequest iPhone McDonald's ÉCOLEécole "
             "snake_case_name kebab-case SCREAMING_CASE a/b/c//\n",
    "contractions": "I'm you're he's we'll they'd I've can't won't it's ' 's 'S 'LL l'homme",
    "long": "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism "
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " + "xyz" * 30,
    "math": "∀x∈ℝ: x² ≥ 0 ⇒ √x ∈ ℝ; ∑ᵢ aᵢ ≈ ∞ — “quotes” ‘single’ «guillemets» …",
    "newlines": "\n\n\n",
    "space": " ",
    "empty": "",
}
MODES: dict[str, tuple[bool, bool]] = {"special": (False, True), "bos+special": (True, True), "plain": (False, False)}


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def record(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's view of the vocabulary in PATH, added to ENTRY (name, kind, ...)."""
    import llama_cpp

    metadata = _load("gguf_metadata", ROOT / "server" / "build" / "gguf_metadata.py")
    meta = metadata.read_metadata(path)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)

    def tid(value: int) -> int | None:
        return None if value < 0 else int(value)

    ids: dict[str, dict[str, list[int]]] = {}
    for name, text in TEXTS.items():
        modes = {mode: llm.tokenize(text.encode("utf-8"), add_bos=a, special=s) for mode, (a, s) in MODES.items()}
        # A mode that gives the same ids as `special` is left out (the tests read it as `special`).
        ids[name] = {m: v for m, v in modes.items() if m == "special" or v != modes["special"]}
    return {
        **entry,
        "tokenizer_sha256": metadata.tokenizer_digest(meta),
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "n_vocab": n,
        "bos": tid(llama_cpp.llama_vocab_bos(vocab)),
        "eos": tid(llama_cpp.llama_vocab_eos(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)],
        "ids": ids,
    }


def _dump(data: dict[str, Any]) -> str:
    """The JSON with one line per vocabulary (diffs stay readable)."""
    head = {k: v for k, v in data.items() if k != "files"}
    text = json.dumps(head, ensure_ascii=False, indent=1)[:-2]
    rows = ",\n  ".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in data["files"])
    return f'{text},\n "files": [\n  {rows}\n ]\n}}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="GGUF files recorded under their file name")
    parser.add_argument("--fixtures", action="store_true", help="record tests/gguf_vocab_fixtures.py's vocabularies")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import llama_cpp

    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    entries = {e["name"]: e for e in old.get("files", [])}
    if args.fixtures:
        sys.path.insert(0, str(ROOT / "tests"))
        fixtures = _load("gguf_vocab_fixtures", ROOT / "tests" / "gguf_vocab_fixtures.py")
        with tempfile.TemporaryDirectory() as tmp:
            for name in fixtures.FIXTURES:
                path = fixtures.write_fixture(name, Path(tmp))
                entries[f"fixture:{name}"] = record(path, {"name": f"fixture:{name}", "fixture": name})
                print(f"recorded fixture {name}", file=sys.stderr)
    for path in args.files:
        entries[f"file:{path.name}"] = record(path, {"name": f"file:{path.name}", "file": path.name})
        print(f"recorded {path.name}", file=sys.stderr)
    data = {
        "about": "llama.cpp's tokenization (llama-cpp-python, vocab_only) of `texts` for GGUF vocabularies, "
                 "written by tools/record_gguf_tokens.py; read by tests/build/test_gguf_tokenizer.py",
        "llama_cpp_python": llama_cpp.__version__,
        "texts": TEXTS,
        "modes": {m: {"add_bos": a, "special": s} for m, (a, s) in MODES.items()},
        "files": sorted(entries.values(), key=lambda e: (e["name"].startswith("file:"), e["name"])),
    }
    args.out.write_text(_dump(data), encoding="utf-8")
    print(f"wrote {args.out} ({len(data['files'])} vocabularies)", file=sys.stderr)


if __name__ == "__main__":
    main()
