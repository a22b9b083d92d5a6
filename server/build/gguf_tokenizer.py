"""A model folder's tokenizer files from a GGUF's `tokenizer.ggml.*` metadata, tokenizing as llama.cpp.

`write_tokenizer(gguf, out_dir)` writes tokenizer.json (the `tokenizers` library), tokenizer_config.json
(chat template, BOS/EOS/UNK/PAD, add_bos_token / add_eos_token), generation_config.json (the
end-of-generation ids) and special_tokens_map.json, the files server/engine/tokenizer.py reads from
any model folder. No torch, no transformers (whose GGUF conversion turns gemma3's vocabulary into
"▁c ap it al" for "capital").

The two vocabularies llama.cpp's decoder models use, as src/llama-vocab.cpp reads them:

- `gpt2`: byte-level BPE. The file's merges in their order (rank), the pre-tokenizer regexes that
  `tokenizer.ggml.pre` names (gguf_pretokenizers.py), `ignore_merges` where llama.cpp sets it.
- `llama`: SentencePiece-style (llm_tokenizer_spm). llama.cpp merges, in a text whose spaces became
  "▁", the adjacent pair whose concatenation is a token of the highest score (the leftmost on a
  tie) until none is left, and spells a character that is no token as its <0xNN> byte tokens. A
  `tokenizers` BPE does exactly that given every split (a, b) of every token into two tokens as a
  merge, ranked by the score of a+b: its merges are made here from the scores (514,847 for gemma3).
  Pairs of equal score keep llama.cpp's leftmost rule only where they are the same pair; gemma3's
  scores are distinct for all but its control, user-defined and byte tokens. As in llama.cpp, any
  token can be a merge's result, control tokens too (none of gemma3's, llama-2's, phi-3's or
  baichuan's can be spelt so). add_space_prefix puts a "▁" before every text piece, i.e. at the
  start and after each special or user-defined token, as llama.cpp does.

Special tokens: llama.cpp first splits the text at the text of every control, unknown and
user-defined token (longest first); with parse_special off, only at user-defined ones. Here they are
added tokens matched on the raw text: control/unknown as special (so `encode_special_tokens`, the
engine's plain-text mode, reads them as text), user-defined as not special. llama.cpp's overrides
by token text are applied too: end-of-turn/FIM-looking tokens become control, gpt-oss's four
channel tokens user-defined, and phi-3's special tokens strip the whitespace on their right.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .gguf_metadata import metadata_from_reader, read_metadata, tokenizer_digest
from .gguf_pretokenizers import PreTokenizer, UnsupportedTokenizer, pre_tokenizer

__all__ = ["GGUFVocab", "UnsupportedTokenizer", "build_tokenizer", "read_vocab", "write_tokenizer"]

# gguf.TokenType (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's space

# llama.cpp's token-text rules (llama_vocab::impl::load), in its order.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: user-defined

_ID_KEYS = {
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
    "unk": "unknown_token_id", "pad": "padding_token_id",
    "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id", "fim_mid": "fim_mid_token_id",
    "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id", "fim_sep": "fim_sep_token_id",
}
_DEPRECATED_FIM_KEYS = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id", "fim_mid": "middle_token_id"}


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp holds it after loading: texts, effective token types, ids, flags."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre ("" when absent)
    tokens: list[str]
    types: list[int]  # after llama.cpp's overrides by text
    scores: list[float]
    merges: list[str]
    ids: dict[str, int | None]  # bos, eos, eot, eom, unk, pad, fim_*: None = none
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    rstrip: frozenset[int]  # special tokens that strip whitespace on their right (phi-3)
    eog: list[int]  # llama.cpp's end-of-generation set, ascending
    chat_template: str | None
    pre_spec: PreTokenizer | None  # gpt2 only
    digest: str  # sha256 of the tokenizer.* metadata

    @property
    def is_spm(self) -> bool:
        return self.model == "llama"

    def text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def _metadata(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | Path):
        return read_metadata(source)
    if hasattr(source, "fields"):  # gguf.GGUFReader
        return metadata_from_reader(source)
    raise TypeError(f"expected a GGUF path, a gguf.GGUFReader or its metadata, not {type(source).__name__}")


def read_vocab(source: Any) -> GGUFVocab:
    """The file's tokenizer (path, gguf.GGUFReader or its metadata) with llama.cpp's defaults and
    overrides applied; UnsupportedTokenizer for a model or pre-tokenizer not rebuilt here."""
    meta = _metadata(source)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"tokenizer.ggml.{key}", default)

    model = get("model")
    if model not in ("gpt2", "llama"):
        raise UnsupportedTokenizer(
            f"tokenizer.ggml.model {model!r} is not supported: only 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece-style) vocabularies are rebuilt from GGUF metadata")
    pre = get("pre") or ""
    spec = pre_tokenizer(pre) if model == "gpt2" else None
    tokens = list(get("tokens") or [])
    if not tokens:
        raise UnsupportedTokenizer("the file has no tokenizer.ggml.tokens")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names them
    if len(set(tokens)) != len(tokens):
        raise UnsupportedTokenizer("tokenizer.ggml.tokens holds the same text twice (llama.cpp refuses it too)")
    n = len(tokens)
    types = [int(t) for t in (get("token_type") or [NORMAL] * n)][:n]
    scores = [float(s) for s in (get("scores") or [0.0] * n)][:n]
    if len(types) < n or len(scores) < n:
        raise UnsupportedTokenizer("tokenizer.ggml.token_type or .scores is shorter than the vocabulary")
    merges = list(get("merges") or [])
    if model == "gpt2" and not merges:
        raise UnsupportedTokenizer("a gpt2 vocabulary without tokenizer.ggml.merges")

    spm = model == "llama"
    defaults: dict[str, int | None] = dict.fromkeys(_ID_KEYS)
    defaults.update({"bos": 1, "eos": 2, "unk": 0} if spm else {"bos": 11, "eos": 11})
    if spec is not None and spec.no_bos:
        defaults["bos"] = None
    ids: dict[str, int | None] = {}
    for name, key in _ID_KEYS.items():
        value = defaults[name]
        value = value if value is not None and value < n else None
        found = get(key, get(_DEPRECATED_FIM_KEYS.get(name, "-"), None))
        ids[name] = int(found) if found is not None and 0 <= int(found) < n else value

    add_bos = bool(get("add_bos_token", spm or (spec is not None and spec.add_bos)))
    add_eos = bool(get("add_eos_token", False))
    add_space_prefix = bool(get("add_space_prefix", spm))
    if ids["bos"] is None:
        add_bos = False
    if ids["eos"] is None:
        add_eos = False

    index = {t: i for i, t in enumerate(tokens)}
    types = _override_types(tokens, types, index, ids)
    eog = _end_of_generation(tokens, types, index, ids)
    name = str(meta.get("general.name", "")).lower()
    rstrip: frozenset[int] = frozenset()
    if "phi-3" in name or "phi3" in name:  # llama.cpp's per-model attributes
        special = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)}
        keep = {index[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in index}
        rstrip = frozenset((special | ({index["</s>"]} if "</s>" in index else set())) - keep)
    template = meta.get("tokenizer.chat_template")
    return GGUFVocab(
        model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges, ids=ids,
        add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix, rstrip=rstrip, eog=eog,
        chat_template=template if isinstance(template, str) and template else None,
        pre_spec=spec, digest=tokenizer_digest(meta))


def _override_types(tokens: list[str], types: list[int], index: dict[str, int],
                    ids: dict[str, int | None]) -> list[int]:
    """llama.cpp's corrections by token text: an end-of-turn, FIM or end-of-generation looking
    token is made control (in `ids` too, for the kinds the file left unset); gpt-oss's channel
    tokens user-defined. (llama.cpp picks among several look-alikes in hash order; here the lowest id.)"""
    types = list(types)

    def force_control(i: int) -> None:
        if types[i] not in (CONTROL, UNKNOWN):
            types[i] = CONTROL

    for kind, texts in (("eot", EOT_TEXTS), ("eom", ("<|eom_id|>",)), *FIM_TEXTS.items()):
        if ids[kind] is None:
            found = sorted(index[t] for t in texts if t in index)
            if found:
                ids[kind] = found[0]
                force_control(found[0])
    for text in EOG_TEXTS:
        if text in index:
            force_control(index[text])
    for text in ALWAYS_RENDERED:
        if text in index:
            types[index[text]] = USER_DEFINED
    return types


def _end_of_generation(tokens: list[str], types: list[int], index: dict[str, int],
                       ids: dict[str, int | None]) -> list[int]:
    """llama.cpp's special_eog_ids: FIM pad/repo/separator, every token with an end-of-generation
    text, EOS/EOT/EOM; less gpt-oss's and solar-open's <|end|>, and a plain </s> (gemma4, plamo)."""
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    eog |= {index[t] for t in EOG_TEXTS if t in index}
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
    texts = {tokens[i] for i in eog}
    if "<|end|>" in texts and (({"<|return|>", "<|call|>"} <= texts) or ({"<|calls|>", "<|flush|>"} <= texts)):
        eog.discard(index["<|end|>"])
        types[index["<|end|>"]] = USER_DEFINED
    if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
        eog.discard(index["</s>"])
        types[index["</s>"]] = NORMAL
    return sorted(eog)


# --- the `tokenizers` pipeline ------------------------------------------------------------------

def _bpe_merges(vocab: GGUFVocab, index: dict[str, int]) -> tuple[list[tuple[str, str]], int]:
    """The file's merges split as llama.cpp splits them (at the first space after the first
    character), in rank order, first occurrence kept; those `tokenizers` cannot hold (a part or
    the result not a token) are dropped and counted."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    dropped = 0
    for text in vocab.merges:
        at = text.find(" ", 1)
        pair = (text[:at], text[at + 1:]) if at > 0 else ("", "")
        if pair in seen:
            continue
        seen.add(pair)
        if pair[0] in index and pair[1] in index and pair[0] + pair[1] in index:
            merges.append(pair)
        else:
            dropped += 1
    return merges, dropped


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every token into two tokens, ranked as llama.cpp's SPM tokenizer would take
    them: by the score of the token they make, highest first (then by token id, then the split)."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _added_tokens(vocab: GGUFVocab, special: bool) -> list[AddedToken]:
    """Control and unknown tokens (special) or user-defined ones (not), matched on the raw text."""
    kinds = (CONTROL, UNKNOWN) if special else (USER_DEFINED,)
    return [AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=i in vocab.rstrip,
                       single_word=False)
            for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)) if kind in kinds]


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor | None:
    """BOS/EOS around an encoding made with add_special_tokens, where the file asks for them."""
    bos = vocab.text(vocab.ids["bos"]) if vocab.add_bos else None
    eos = vocab.text(vocab.ids["eos"]) if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    ends = [(t, vocab.tokens.index(t)) for t in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    single = " ".join(x for x in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if x)
    pair = single + " " + " ".join(x for x in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if x)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)


def build_tokenizer(vocab: GGUFVocab) -> tuple[Tokenizer, dict[str, Any]]:
    """The `tokenizers` Tokenizer for VOCAB and facts about the build (merge counts)."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    facts: dict[str, Any] = {}
    if vocab.is_spm:
        merges = spm_merges(vocab.tokens, vocab.scores)
        byte_fallback = any(t == BYTE for t in vocab.types)
        unk = vocab.text(vocab.ids["unk"])
        tokenizer = Tokenizer(models.BPE(vocab=index, merges=merges, unk_token=unk, byte_fallback=byte_fallback,
                                         fuse_unk=False, ignore_merges=False))
        steps = [normalizers.Prepend(SPACE)] if vocab.add_space_prefix else []
        tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
        tail = [decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix else []
        tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                               decoders.Fuse(), *tail])
        facts["merges"] = len(merges)
    else:
        merges, dropped = _bpe_merges(vocab, index)
        assert vocab.pre_spec is not None
        tokenizer = Tokenizer(models.BPE(vocab=index, merges=merges, ignore_merges=vocab.pre_spec.ignore_merges,
                                         fuse_unk=False, byte_fallback=False))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
                  for r in vocab.pre_spec.expressions]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        tokenizer.decoder = decoders.ByteLevel()
        facts.update(merges=len(merges), merges_dropped=dropped)
    # add_special_tokens marks every token it is given special, whatever its AddedToken says.
    tokenizer.add_special_tokens(_added_tokens(vocab, special=True))
    tokenizer.add_tokens(_added_tokens(vocab, special=False))
    post = _post_processor(vocab)
    if post is not None:
        tokenizer.post_processor = post
    return tokenizer, facts


# --- the model folder's files -------------------------------------------------------------------

def _turn_ends(vocab: GGUFVocab) -> list[int]:
    """End-of-generation tokens the chat template writes (the ones a turn ends with)."""
    template = vocab.chat_template or ""
    return [i for i in vocab.eog if vocab.tokens[i] in template]


def _configs(vocab: GGUFVocab) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    ids, text = vocab.ids, vocab.text
    eos_ids = list(dict.fromkeys([*([ids["eos"]] if ids["eos"] is not None else []), *vocab.eog]))
    named = {f"{k}_token": text(ids[k]) for k in ("bos", "eos", "unk", "pad") if ids[k] is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "clean_up_tokenization_spaces": bool(vocab.pre_spec.clean_spaces) if vocab.pre_spec else False,
        "model_input_names": ["input_ids", "attention_mask"],
        # The engine's own key (server/engine/tokenizer.py): every prompt starts with one BOS, as
        # llama.cpp does for a file whose add_bos_token is set. add_bos_token alone is not enough:
        # transformers' configs set it for SmolLM2, whose "BOS" is <|im_start|>.
        "prompt_starts_with_bos": vocab.add_bos and ids["bos"] is not None,
    }
    if vocab.chat_template:
        tokenizer_config["chat_template"] = vocab.chat_template
    generation_config: dict[str, Any] = {
        "eos_token_id": eos_ids if len(eos_ids) != 1 else eos_ids[0],
        **({"bos_token_id": ids["bos"]} if ids["bos"] is not None else {}),
        **({"pad_token_id": ids["pad"]} if ids["pad"] is not None else {}),
    }
    return tokenizer_config, generation_config, named


def write_tokenizer(source: Any, out_dir: str | Path) -> dict[str, Any]:
    """Writes tokenizer.json, tokenizer_config.json, generation_config.json and
    special_tokens_map.json for the GGUF SOURCE (path, gguf.GGUFReader or its metadata) into
    OUT_DIR; returns a summary (model kind, pre, vocab size, bos/eos ids, add_bos, end-of-generation
    ids, ...). UnsupportedTokenizer when the vocabulary cannot be rebuilt (nothing is written)."""
    vocab = read_vocab(source)
    tokenizer, facts = build_tokenizer(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_config, generation_config, named = _configs(vocab)
    tokenizer.save(str(out / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config),
                       ("special_tokens_map.json", named)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {
        "model": vocab.model,
        "pre": vocab.pre or None,
        "vocab_size": len(vocab.tokens),
        "bos_token_id": vocab.ids["bos"],
        "eos_token_id": vocab.ids["eos"],
        "eot_token_id": vocab.ids["eot"],
        "pad_token_id": vocab.ids["pad"],
        "eog_token_ids": vocab.eog,
        "turn_end_token_ids": _turn_ends(vocab),
        "add_bos": vocab.add_bos,
        "add_eos": vocab.add_eos,
        **({"add_space_prefix": vocab.add_space_prefix} if vocab.is_spm else {}),
        "special_tokens": sum(t in (CONTROL, UNKNOWN) for t in vocab.types),
        "user_defined_tokens": sum(t == USER_DEFINED for t in vocab.types),
        "chat_template": vocab.chat_template is not None,
        "tokenizer_sha256": vocab.digest,
        **facts,
    }
