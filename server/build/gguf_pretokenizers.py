r"""What `tokenizer.ggml.pre` names: the pre-tokenizer regexes and flags llama.cpp gives it.

Copied from llama.cpp's src/llama-vocab.cpp (the version llama-cpp-python 0.3.36 vendors):
`llm_tokenizer_bpe`'s regex lists per LLAMA_VOCAB_PRE_TYPE_* and the name -> type chain of
`llama_vocab::impl::load` with its flags (ignore_merges, add_bos, clean_spaces, no BOS). The
expressions are llama.cpp's own, not the original tokenizer.json's where llama.cpp rewrote one
(e.g. tekken's and gpt-4o's case classes as lookaheads, bailingmoe's possessive quantifiers made
greedy), and as llama.cpp runs them where it reads one differently (an expression with a \p{..}
runs on text whose characters are collapsed to one byte per category, where \p{Lu}, \p{Ll}, ...
all mean \p{L}): parity with llama.cpp is what tests/data/gguf_tokens.json checks. llama.cpp applies the
list in order, each expression splitting the pieces of the one before, unmatched text staying a
piece of its own: a `tokenizers` Sequence of Split(..., "isolated").

Not here (refused by name): pre-tokenizers llama.cpp runs through code of its own rather than a
regex (kimi-k2, afmoe, tiny_aya's digit groups, superbpe's zero-width split), vocabularies that
are not byte-level BPE (gemma4, sarvam-moe, whitespace), image tokens (chameleon), and the
encoder models' ones (a SEP token, a left-stripped mask).
"""

from __future__ import annotations

from dataclasses import dataclass

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_KANA = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
_CJK_HANGUL = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"
_NORDIC = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+"


def _cased(suffix: str) -> str:
    """A word as upper* lower+ or upper+ lower*, each "letter not a-z" / "letter not A-Z"."""
    return (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + suffix
            + r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + suffix)


REGEXES: dict[str, tuple[str, ...]] = {
    "DEFAULT": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "GPT2": (_GPT2,),
    "STARCODER": (r"\p{N}", _GPT2),
    "FALCON": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "LLAMA3": (_LLAMA3,),
    "JAIS2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)"
              r"|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",),
    "QWEN2": (_QWEN2,),
    "QWEN35": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "DEEPSEEK_LLM": (
        r"[\r\n]",
        r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}"
        r"\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}"
        r"\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
        r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
        r"\s+$",
        _CJK_HANGUL,
        r"\p{N}+",
    ),
    "DEEPSEEK_CODER": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "DEEPSEEK3_LLM": (r"\p{N}{1,3}", _CJK_KANA, _DEEPSEEK3),
    "SPARK2_5": (r"\p{N}{1,3}", _CJK_KANA,
                 r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                 r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"),
    "YOUTU": (r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+"
              r"|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}\x{2019}\x{2014}\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}\x{FE30}-\x{FE4F}]+"
              r"|[\x{3105}-\x{312F}]+|" + _CJK_KANA,
              # llama.cpp's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] and [\p{Ll}\p{Lm}\p{Lo}\p{M}], as it runs
              # them: its collapsed categories read every \p{L*} as \p{L}
              r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]*[\p{L}\p{M}]+" + _CONTRACTIONS + "?"
              + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+[\p{L}\p{M}]*" + _CONTRACTIONS + "?"
              + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "NORDIC": (_NORDIC,),
    "VIKING": (_NORDIC, r"\p{N}"),
    "TEKKEN": (_cased("") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "GPT4O": (_cased(_CONTRACTIONS + "?")
              + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "BAILINGMOE": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "SEED_CODER": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "UFAKZEKA": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "LAGUNA": (r"[^\n]+|[\n]+", _QWEN2),
    "EXAONE_MOE": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "MINICPM5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@dataclass(frozen=True)
class PreTokenizer:
    """One `tokenizer.ggml.pre` value as llama.cpp loads it."""

    regexes: str  # key of REGEXES
    ignore_merges: bool = False  # a piece that is a whole token is that token (llama3, tekken)
    add_bos: bool = False  # llama.cpp's add_bos when the file has no tokenizer.ggml.add_bos_token
    clean_spaces: bool = True  # clean_up_tokenization_spaces (decoding only)
    no_bos: bool = False  # no BOS token unless the file names one (chatglm)

    @property
    def expressions(self) -> tuple[str, ...]:
        return REGEXES[self.regexes]


def _names(names: str, spec: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), spec)


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_names("default", PreTokenizer("DEFAULT")),
    **_names("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
             PreTokenizer("LLAMA3", ignore_merges=True, add_bos=True)),
    **_names("dbrx smaug-bpe", PreTokenizer("LLAMA3")),
    **_names("deepseek-llm", PreTokenizer("DEEPSEEK_LLM", clean_spaces=False)),
    **_names("deepseek-coder", PreTokenizer("DEEPSEEK_CODER", clean_spaces=False)),
    **_names("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", PreTokenizer("DEEPSEEK3_LLM", clean_spaces=False)),
    **_names("spark2_5", PreTokenizer("SPARK2_5", clean_spaces=False)),
    **_names("youtu", PreTokenizer("YOUTU", ignore_merges=True, clean_spaces=False)),
    **_names("falcon", PreTokenizer("FALCON")),
    **_names("starcoder refact codeshell exaone minerva-7b mellum2", PreTokenizer("STARCODER")),
    **_names("command-r smollm", PreTokenizer("STARCODER", clean_spaces=False)),
    **_names("gpt-2 phi-2 jina-es jina-de gigachat a.x-4.0 mellum mpt olmo jais exaone4",
             PreTokenizer("GPT2")),
    **_names("trillion granite-docling", PreTokenizer("GPT2", clean_spaces=False)),
    **_names("jais-2", PreTokenizer("JAIS2")),
    **_names("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", PreTokenizer("QWEN2", clean_spaces=False)),
    **_names("stablelm2 megrez", PreTokenizer("QWEN2")),
    **_names("qwen35", PreTokenizer("QWEN35", clean_spaces=False)),
    **_names("poro-chat", PreTokenizer("NORDIC", clean_spaces=False)),
    **_names("bloom gpt3-finnish", PreTokenizer("NORDIC")),
    **_names("viking", PreTokenizer("VIKING", clean_spaces=False)),
    **_names("chatglm-bpe", PreTokenizer("LLAMA3", no_bos=True)),
    **_names("glm4 glm5", PreTokenizer("LLAMA3", ignore_merges=True, no_bos=True)),
    **_names("tekken", PreTokenizer("TEKKEN", ignore_merges=True, add_bos=True, clean_spaces=False)),
    **_names("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer("GPT4O", clean_spaces=False)),
    **_names("bailingmoe bailingmoe2 llada-moe", PreTokenizer("BAILINGMOE", clean_spaces=False)),
    **_names("seed-coder", PreTokenizer("SEED_CODER", clean_spaces=False)),
    **_names("ufakzeka", PreTokenizer("UFAKZEKA", clean_spaces=False)),
    **_names("grok-2", PreTokenizer("QWEN2", clean_spaces=False)),
    **_names("laguna", PreTokenizer("LAGUNA", clean_spaces=False)),
    **_names("exaone-moe", PreTokenizer("EXAONE_MOE")),
    **_names("minicpm5", PreTokenizer("MINICPM5", ignore_merges=True)),
}

# Known to llama.cpp but not convertible to a `tokenizers` pipeline here, and why.
REFUSED: dict[str, str] = {
    **dict.fromkeys("kimi-k2 afmoe tiny_aya cohere2moe superbpe".split(),
                    "llama.cpp splits it with code of its own, not a regex"),
    **dict.fromkeys("gemma4 granite-embed-multi-311m sarvam-moe whitespace".split(),
                    "not a byte-level BPE (llama.cpp runs it on raw UTF-8)"),
    "chameleon": "its image tokens need llama.cpp's chameleon pre-tokenizer",
    **dict.fromkeys("jina-v1-en jina-v2-code roberta-bpe jina-v2-es jina-v2-de modern-bert "
                    "granite-embed-multi-97m".split(), "an encoder's tokenizer (SEP token, mask stripping)"),
}


class UnsupportedTokenizer(ValueError):
    """The GGUF's tokenizer cannot be rebuilt here; the message names what and why (an import then
    falls back to another route or refuses)."""


class UnknownPreTokenizer(UnsupportedTokenizer):
    """`tokenizer.ggml.pre` names a pre-tokenizer this converter does not reproduce."""


def pre_tokenizer(name: str) -> PreTokenizer:
    """The spec of NAME ("" = missing, which llama.cpp reads as "default" with a warning)."""
    spec = PRE_TOKENIZERS.get(name or "default")
    if spec is not None:
        return spec
    why = REFUSED.get(name, "llama.cpp does not know it either" if name else "")
    raise UnknownPreTokenizer(f"tokenizer.ggml.pre {name!r} is not supported ({why}); "
                              f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
