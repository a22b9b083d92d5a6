"""Small tokenizer-only GGUFs: the vocabularies the GGUF tokenizer tests always have.

The tests compare server/build/gguf_tokenizer.py with llama.cpp's own tokenization, recorded by
tools/record_gguf_tokens.py into tests/data/gguf_tokens.json. Real GGUFs are large, so the fast
tier builds its files here, from tests/data/gguf_vocab_bpe.json.gz (committed, 30 KB):

- `bpe-<pre>`: a byte-level BPE made of SmolLM2-135M's vocabulary (Apache-2.0) cut to its first
  3,000 merges, its 256 byte symbols and the merged tokens, then CHAINS' words made tokens (digit
  groups, whitespace runs, case changes, CJK next to punctuation, ...: what tells the
  pre-tokenizers apart), with control tokens (ChatML's, an end-of-turn, a FIM pad) and user-defined
  ones added, written once per pre-tokenizer name: the pre-tokenizers' regexes are what differs
  between families, and llama.cpp runs each on this vocabulary.
- `spm`, `spm-noprefix`: a SentencePiece-style vocabulary made of the same tokens (their text,
  spaces as "▁", scores by merge rank, <0xNN> byte tokens, <unk>/<s>/</s>, gemma-like control and
  user-defined tokens): llama.cpp's `llama` tokenizer with and without add_space_prefix.

Every file here is metadata only (general.architecture and tokenizer.*): llama.cpp loads such a
file with vocab_only=True. `python tests/gguf_vocab_fixtures.py SMOLLM2.gguf` remakes the data.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

DATA = Path(__file__).parent / "data" / "gguf_vocab_bpe.json.gz"
N_MERGES = 3000
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
# Pre-tokenizer names the fixture is written with: one or more per llama.cpp regex list.
BPE_PRES = (
    "default", "gpt-2", "llama-bpe", "dbrx", "qwen2", "qwen35", "stablelm2", "smollm", "starcoder",
    "command-r", "falcon", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu",
    "jais-2", "poro-chat", "viking", "chatglm-bpe", "glm4", "tekken", "gpt-4o", "bailingmoe",
    "seed-coder", "ufakzeka", "laguna", "exaone-moe", "minicpm5", "olmo",
)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def make_data(smollm2_gguf: Path, out: Path = DATA) -> None:
    """Cuts SmolLM2's vocabulary to its first N_MERGES merges (what DATA holds)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "server" / "build"))
    from gguf_metadata import read_metadata

    meta = read_metadata(smollm2_gguf)
    merges = meta["tokenizer.ggml.merges"][:N_MERGES]
    tokens = list(_bytes_to_unicode().values())
    have = set(tokens)
    for m in merges:
        a, b = m.split(" ", 1)
        assert a in have and b in have, m
        if a + b not in have:
            tokens.append(a + b)
            have.add(a + b)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"source": "SmolLM2-135M-Instruct (Apache-2.0), first merges", "tokens": tokens,
                   "merges": merges}, f, ensure_ascii=False, separators=(",", ":"))


def _data() -> dict[str, Any]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        return json.load(f)


def _writer(path: Path, arch: str = "llama") -> gguf.GGUFWriter:
    return gguf.GGUFWriter(str(path), arch)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Words made tokens after SmolLM2's merges (each merged left to right, a merge per character), so
# that the pre-tokenizers tell apart: digit groups, whitespace runs, punctuation next to a space or a
# newline, contractions in either case, case changes inside a word, CJK next to punctuation, emoji.
CHAINS = (
    "12", "123", "1234", " 1", " 12", " 123", " 2024", "2024", "99", "000", ",000", "3.14", "-42",
    "\n\n", "\n\n\n", " \n", "\n ", "  ", "   ", "    ", "\t\t", " \t", ".\n", ";\n", ":\n",
    " (", "()", "):", "!!", "?\n", " \"", "\">", "=\"", "->", "::", "&&", "||", "!=", " //", " #",
    "'s", "'S", "'ll", "'LL", "'re", "'m", "n't", " '", "'t", "s'", "I'M",
    "aÉ", "ÀÉ", "Éc", "oW", "Wo", "cola", "Straß", "ße", "İs", "Ωm",
    "你好", " 你好", "好，", "，世界", "界！", "。\n", "日本", "語の", "한국", " 한국",
    " 🤖", "🤖🚀", "❤️", "️ ", "👋🏽", "🇫🇷",
    "\u00a0", " \u00a0", "\u3000", "e\u0301", "x²", "²³", "½", "١٢٣", " $1", "99%", "1e-9",
    " ▁", "▁▁", "|>", "<|", " <", "</", "s>",
    "lC", "eN", "tH", "TP", "PR", "Re", "tHt", "iP", " iPh", "cD", "LEé", "Éé", " get", "/\n", "//",
    " antidisestablishmentarianism", "Pneumonoultramicroscopic",
)
BPE_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_turn>", "<|fim_pad|>")
BPE_USER = ("<think>", "</think>", "<tool_call>")


def _chained(tokens: list[str], merges: list[str]) -> tuple[list[str], list[str]]:
    """TOKENS and MERGES with CHAINS made tokens (byte-level text), merges ranked after the rest."""
    to_char = _bytes_to_unicode()
    tokens, merges = list(tokens), list(merges)
    have, ranked = set(tokens), set(merges)
    for word in CHAINS:
        chars = [to_char[b] for b in word.encode("utf-8")]
        left = chars[0]
        for right in chars[1:]:
            merge = f"{left} {right}"
            left += right
            if merge not in ranked:
                merges.append(merge)
                ranked.add(merge)
            if left not in have:
                tokens.append(left)
                have.add(left)
    return tokens, merges


def bpe_tokens() -> tuple[list[str], list[int], list[str]]:
    data = _data()
    body, merges = _chained(data["tokens"], data["merges"])
    tokens = [*BPE_CONTROL, *body, *BPE_USER]
    types = [CONTROL] * len(BPE_CONTROL) + [NORMAL] * len(body) + [USER_DEFINED] * len(BPE_USER)
    return tokens, types, merges


def write_bpe(path: Path, pre: str) -> None:
    """The cut vocabulary as a gpt2 tokenizer with pre-tokenizer PRE (ids as convert_hf_to_gguf
    writes them; add_bos/add_eos left to llama.cpp's defaults for PRE)."""
    tokens, types, merges = bpe_tokens()
    w = _writer(path)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    _finish(w)


SPM_HEAD = (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<start_of_turn>", CONTROL),
            ("<end_of_turn>", CONTROL), ("<table>", USER_DEFINED), ("  ", USER_DEFINED))


def spm_tokens() -> tuple[list[str], list[int], list[float]]:
    """The cut vocabulary as SentencePiece pieces: each byte-level token's text (spaces as "▁";
    tokens that are not whole UTF-8 characters dropped), scored by merge rank, every character of
    them a piece of its own, and the 256 <0xNN> byte tokens."""
    data = _data()
    body, _ = _chained(data["tokens"], data["merges"])
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    tokens = [t for t, _ in SPM_HEAD] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in SPM_HEAD] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    pieces: list[str] = []
    for token in body[256:]:
        try:
            pieces.append(bytes(decode[c] for c in token).decode("utf-8").replace(" ", "\u2581"))
        except UnicodeDecodeError:
            continue
    chars = sorted({c for p in pieces for c in p} | {chr(c) for c in range(0x21, 0x7F)} | {"\u2581"})
    have = set(tokens)
    for c in chars:
        if c not in have:
            tokens.append(c)
            types.append(NORMAL)
            scores.append(-1e6)
            have.add(c)
    for rank, piece in enumerate(pieces):
        if piece not in have:
            tokens.append(piece)
            types.append(NORMAL)
            scores.append(-float(rank))
            have.add(piece)
    return tokens, types, scores


def write_spm(path: Path, add_space_prefix: bool | None) -> None:
    """A `llama` tokenizer; add_space_prefix None leaves llama.cpp's default (on)."""
    tokens, types, scores = spm_tokens()
    w = _writer(path)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
        w.add_add_bos_token(True)
    _finish(w)


FIXTURES: dict[str, Callable[[Path], None]] = {
    **{f"bpe-{pre}": (lambda path, pre=pre: write_bpe(path, pre)) for pre in BPE_PRES},
    "spm": lambda path: write_spm(path, None),
    "spm-noprefix": lambda path: write_spm(path, False),
}


def write_fixture(name: str, folder: Path) -> Path:
    """Writes fixture NAME into FOLDER (once) and returns its path."""
    path = folder / f"{name}.gguf"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        FIXTURES[name](path)
    return path


if __name__ == "__main__":
    make_data(Path(sys.argv[1]))
    print(f"wrote {DATA} ({DATA.stat().st_size} bytes)")
