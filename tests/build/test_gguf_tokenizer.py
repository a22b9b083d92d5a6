"""server/build/gguf_tokenizer.py: a model folder's tokenizer from GGUF metadata, tokenizing as llama.cpp.

The reference is llama.cpp itself: tools/record_gguf_tokens.py ran llama-cpp-python over fixed texts
(emoji, CJK, code, accents, whitespace runs, digits, special tokens, ...) for each vocabulary and
wrote the ids into tests/data/gguf_tokens.json; each test rebuilds a recorded vocabulary (its
tokenizer metadata's sha256 must be the recorded one) and must give the same ids in all three modes
(special tokens parsed; with BOS/EOS; special tokens as text), the same BOS/EOS/add_bos and the
same end-of-generation ids.

- Always (the fast tier): tests/gguf_vocab_fixtures.py's small vocabularies (a byte-level BPE under
  30 pre-tokenizer names, SentencePiece-style with and without a space prefix), plus a Python port
  of llama.cpp's SPM tokenizer on random text, round trips, special tokens, the chat template.
- The slow tier: SmolLM2-135M's GGUF, which `make model` leaves in the store's .cache/.
- `make test-gguf-files` (marker gguf_files, outside make test): the other recorded files (gemma3-270m,
  qwen2.5-coder-0.5b, llama.cpp's own vocab-only GGUFs from the llama-cpp-python source archive),
  found in $TOKENWIRE_GGUF_DIRS, the store's .cache/ or that archive; a missing file fails.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any

import gguf
import pytest
from gguf_vocab_fixtures import FIXTURES, write_fixture
from tokenizers import Tokenizer

from tokenwire.server.build.gguf_metadata import metadata_from_reader, read_metadata
from tokenwire.server.build.gguf_pretokenizers import UnknownPreTokenizer
from tokenwire.server.build.gguf_tokenizer import UnsupportedTokenizer, read_vocab, write_tokenizer
from tokenwire.server.engine.text_stream import TextStream
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.store import default_store_path

RECORD = json.loads((Path(__file__).parents[1] / "data" / "gguf_tokens.json").read_text(encoding="utf-8"))
TEXTS: dict[str, str] = RECORD["texts"]
MODES = tuple(RECORD["modes"])
ENTRIES = {e["name"]: e for e in RECORD["files"]}
STORE_FILE = "file:SmolLM2-135M-Instruct.Q4_1.gguf"  # make model's GGUF
OTHER_FILES = sorted(n for n in ENTRIES if n.startswith("file:") and n != STORE_FILE)
SPECIAL_FREE = [n for n, t in TEXTS.items() if n not in ("specials", "lookalikes")]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-vocab")


def encodings(folder: Path, text: str) -> dict[str, list[int]]:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return _encodings(tok, text)


def _encodings(tok: Tokenizer, text: str) -> dict[str, list[int]]:
    special = tok.encode(text, add_special_tokens=False).ids
    with_ends = tok.encode(text, add_special_tokens=True).ids
    tok.encode_special_tokens = True  # the engine's plain-text mode (TokenizerBundle._plain)
    try:
        plain = tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False
    return {"special": special, "bos+special": with_ends, "plain": plain}


def check_against_llama_cpp(entry: dict[str, Any], gguf_path: Path, out: Path) -> dict[str, Any]:
    """Writes the tokenizer of GGUF_PATH into OUT and checks it against ENTRY's record."""
    summary = write_tokenizer(gguf_path, out)
    assert summary["tokenizer_sha256"] == entry["tokenizer_sha256"], (
        f"{gguf_path.name}'s tokenizer metadata is not the recorded one: re-record it with tools/record_gguf_tokens.py")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    wrong = []
    for name, text in TEXTS.items():
        recorded = entry["ids"][name]
        got = _encodings(tok, text)
        for mode in MODES:
            expected = recorded.get(mode, recorded["special"])
            if got[mode] != expected:
                wrong.append(f"{name}/{mode}: ours {[tok.id_to_token(i) for i in got[mode]][:40]}\n"
                             f"   llama.cpp {[tok.id_to_token(i) for i in expected][:40]}")
    assert not wrong, f"{len(wrong)} of {len(TEXTS) * len(MODES)} differ from llama.cpp:\n" + "\n".join(wrong[:6])
    assert (summary["bos_token_id"], summary["eos_token_id"]) == (entry["bos"], entry["eos"])
    assert (summary["add_bos"], summary["add_eos"]) == (entry["add_bos"], entry["add_eos"])
    assert summary["eog_token_ids"] == entry["eog"]
    assert summary["vocab_size"] == entry["n_vocab"]
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == set(entry["eog"]) | {entry["eos"]}
    return summary


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_vocabularies_tokenize_as_llama_cpp(name: str, fixture_dir: Path, tmp_path: Path) -> None:
    check_against_llama_cpp(ENTRIES[f"fixture:{name}"], write_fixture(name, fixture_dir), tmp_path)


def test_every_fixture_is_recorded() -> None:
    assert {f"fixture:{n}" for n in FIXTURES} <= set(ENTRIES)
    # the pre-tokenizers are told apart: the fixture's ids differ between regex families
    bpe = [e for e in RECORD["files"] if e.get("fixture", "").startswith("bpe-")]
    assert len({json.dumps(e["ids"], sort_keys=True) for e in bpe}) >= 20


# --- llama.cpp's SPM tokenizer, ported, on random text ------------------------------------------

def llama_spm(tokens: list[str], types: list[int], scores: list[float], text: str,
              add_space_prefix: bool, parse_special: bool) -> list[int]:
    """llama.cpp's tokenize() for a `llama` vocabulary: tokenizer_st_partition (longest special
    text first), a "▁" before each text fragment that follows a special token (or starts),
    llm_tokenizer_spm_session (highest-score pair first, leftmost on ties; bytes for the rest)."""
    index = {t: i for i, t in enumerate(tokens)}
    kinds = (2, 3, 4) if parse_special else (4,)
    special = sorted((i for i, k in enumerate(types) if k in kinds), key=lambda i: -len(tokens[i]))
    fragments: list[str | int] = [text] if text else []
    for sid in special:
        split: list[str | int] = []
        for f in fragments:
            if isinstance(f, int):
                split.append(f)
                continue
            for k, part in enumerate(f.split(tokens[sid])):
                split += ([sid] if k else []) + ([part] if part else [])
        fragments = split
    out: list[int] = []
    after_special = True
    for f in fragments:
        if isinstance(f, int):
            out.append(f)
            after_special = True
            continue
        piece = ((" " if add_space_prefix and after_special else "") + f).replace(" ", "\u2581")
        out += _spm_session(piece, index, scores)
        after_special = False
    return out


def _spm_session(text: str, index: dict[str, int], scores: list[float]) -> list[int]:
    syms = [[c, i - 1, i + 1 if i + 1 < len(text) else -1] for i, c in enumerate(text)]  # text, prev, next
    queue: list[tuple[float, int, int, int]] = []

    def add(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and (tid := index.get(syms[left][0] + syms[right][0])) is not None:
            heapq.heappush(queue, (-scores[tid], left, right, len(syms[left][0]) + len(syms[right][0])))

    for i in range(1, len(syms)):
        add(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not syms[left][0] or not syms[right][0] or len(syms[left][0]) + len(syms[right][0]) != size:
            continue
        syms[left][0] += syms[right][0]
        syms[right][0] = ""
        syms[left][2] = syms[right][2]
        if syms[right][2] >= 0:
            syms[syms[right][2]][1] = left
        add(syms[left][1], left)
        add(left, syms[left][2])
    out, i = [], 0 if syms else -1
    while i != -1:
        s = syms[i][0]
        out += [index[s]] if s in index else [index[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        i = syms[i][2]
    return out


@pytest.mark.parametrize("name", ["spm", "spm-noprefix"])
def test_spm_matches_llama_cpps_algorithm_on_random_text(name: str, fixture_dir: Path, tmp_path: Path) -> None:
    path = write_fixture(name, fixture_dir)
    vocab = read_vocab(path)
    write_tokenizer(path, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(14)
    alphabet = ([t for t in vocab.tokens if 1 <= len(t) <= 3 and not t.startswith("<0x")]
                + [" ", "  ", "\n", "\t", "▁", "ж", "😀", "é", "<s>", "</s>", "<table>", "<start_of_turn>"])
    checked = 0
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))).replace("▁", " ")
        for parse_special in (True, False):
            expected = llama_spm(vocab.tokens, vocab.types, vocab.scores, text, vocab.add_space_prefix, parse_special)
            tok.encode_special_tokens = not parse_special
            assert tok.encode(text, add_special_tokens=False).ids == expected, (text, parse_special)
            checked += 1
    assert checked == 600


def test_the_port_agrees_with_the_record(fixture_dir: Path) -> None:
    """The Python port above is itself llama.cpp's algorithm: it gives the recorded ids."""
    for name in ("spm", "spm-noprefix"):
        vocab = read_vocab(write_fixture(name, fixture_dir))
        entry = ENTRIES[f"fixture:{name}"]
        for text_name, text in TEXTS.items():
            for mode, parse in (("special", True), ("plain", False)):
                expected = entry["ids"][text_name].get(mode, entry["ids"][text_name]["special"])
                assert llama_spm(vocab.tokens, vocab.types, vocab.scores, text, vocab.add_space_prefix,
                                 parse) == expected, (name, text_name, mode)


# --- decoding, special tokens, the chat template --------------------------------------------------

@pytest.mark.parametrize("name", ["bpe-qwen2", "bpe-llama-bpe", "spm", "spm-noprefix"])
def test_decoding_round_trips(name: str, fixture_dir: Path, tmp_path: Path) -> None:
    path = write_fixture(name, fixture_dir)
    vocab = read_vocab(path)
    write_tokenizer(path, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bundle = TokenizerBundle(tmp_path)
    user_defined = [t for t, k in zip(vocab.tokens, vocab.types, strict=True) if k == 4]
    for text_name in SPECIAL_FREE:
        text = TEXTS[text_name]
        if vocab.add_space_prefix and any(t in text for t in user_defined):
            continue  # llama.cpp puts a "▁" after every special or user-defined token: not the text
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, text_name
        assert bundle.decode(bundle.encode(text)) == text, text_name
        stream = TextStream(tok)  # the engine's streamed text: whole characters only, same text
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) == text, text_name
        assert all("\ufffd" not in p for p in pieces), text_name


def test_special_tokens_parse_as_single_ids(fixture_dir: Path, tmp_path: Path) -> None:
    for name in ("bpe-qwen2", "spm-noprefix"):
        out = tmp_path / name
        write_tokenizer(write_fixture(name, fixture_dir), out)
        vocab = read_vocab(write_fixture(name, fixture_dir))
        for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
            if kind not in (2, 3, 4):
                continue
            got = encodings(out, text)
            assert got["special"] == [i], (name, text)
            if kind == 4:  # user-defined: a token in either mode, as llama.cpp
                assert got["plain"] == [i], (name, text)
            elif vocab.is_spm:  # llama.cpp's SPM merges may spell a control token (this fixture's
                # "<" + "s>"; no real vocabulary checked can): whatever its algorithm gives
                assert got["plain"] == llama_spm(vocab.tokens, vocab.types, vocab.scores, text,
                                                 vocab.add_space_prefix, parse_special=False), (name, text)
            else:  # control: plain text when special tokens are not parsed
                assert i not in got["plain"] and len(got["plain"]) > 1, (name, text)


def test_chat_template_renders_and_ends_turns(fixture_dir: Path, tmp_path: Path) -> None:
    summary = write_tokenizer(write_fixture("bpe-qwen2", fixture_dir), tmp_path)
    bundle = TokenizerBundle(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_start|>"}]
    assert bundle.render_chat(messages) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                            "<|im_start|>user\nHi <|im_start|><|im_end|>\n<|im_start|>assistant\n")
    ids = bundle.encode_chat(messages)
    im_start, im_end = bundle.tokenizer.token_to_id("<|im_start|>"), bundle.tokenizer.token_to_id("<|im_end|>")
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2  # the user's "<|im_start|>" stays text
    assert bundle.decode(ids) == "system\nBe brief.\nuser\nHi <|im_start|>\nassistant\n"
    assert summary["turn_end_token_ids"] == [im_end]
    eog = {bundle.tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|fim_pad|>")}
    assert bundle.eos_token_ids == eog == set(summary["eog_token_ids"])
    assert bundle.bos_token == "<|endoftext|>" and bundle.has_chat_template
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("name", ["bpe-qwen2", "spm"])
def test_grammar_engine_reads_the_tokenizer(name: str, fixture_dir: Path, tmp_path: Path) -> None:
    write_tokenizer(write_fixture(name, fixture_dir), tmp_path)
    bundle = TokenizerBundle(tmp_path)
    assert bundle.grammar.get().vocab_size == bundle.tokenizer.get_vocab_size()


def test_metadata_reader_equals_gguf_reader(fixture_dir: Path, tmp_path: Path) -> None:
    path = write_fixture("spm", fixture_dir)
    ours, theirs = read_metadata(path), metadata_from_reader(gguf.GGUFReader(path))
    assert ours == theirs
    write_tokenizer(gguf.GGUFReader(path), tmp_path / "reader")
    write_tokenizer(path, tmp_path / "path")
    assert (tmp_path / "reader" / "tokenizer.json").read_bytes() == (tmp_path / "path" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("pre, needle", [("kimi-k2", "code of its own"), ("no-such-pre", "no-such-pre"),
                                         ("gemma4", "not a byte-level BPE")])
def test_unknown_pre_tokenizers_are_refused_by_name(pre: str, needle: str, fixture_dir: Path, tmp_path: Path) -> None:
    meta = read_metadata(write_fixture("bpe-qwen2", fixture_dir))
    meta["tokenizer.ggml.pre"] = pre
    with pytest.raises(UnknownPreTokenizer, match=needle) as info:
        write_tokenizer(meta, tmp_path)
    assert repr(pre) in str(info.value) and "qwen2" in str(info.value)  # names what is supported
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("change, needle", [({"tokenizer.ggml.model": "bert"}, "'bert'"),
                                            ({"tokenizer.ggml.merges": []}, "merges"),
                                            ({"tokenizer.ggml.tokens": ["a", "a"]}, "twice")])
def test_unsupported_vocabularies_are_refused(change: dict, needle: str, fixture_dir: Path, tmp_path: Path) -> None:
    meta = {**read_metadata(write_fixture("bpe-qwen2", fixture_dir)), **change}
    with pytest.raises(UnsupportedTokenizer, match=needle):
        write_tokenizer(meta, tmp_path)


# --- real GGUF files ------------------------------------------------------------------------------

def _sdist_vocab(file_name: str, cache: Path) -> Path | None:
    """llama.cpp's vocab-only test GGUF FILE_NAME out of the llama-cpp-python source archive that
    bench/peers/setup.sh (or make test-gguf-files) downloads."""
    version = RECORD["llama_cpp_python"]
    peers = Path(os.environ.get("TOKENWIRE_PEERS_CACHE", Path.home() / ".cache" / "tokenwire" / "peers"))
    archive = peers / "src" / f"llama_cpp_python-{version}.tar.gz"
    target = cache / file_name
    if not target.exists() and archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if "/vendor/llama.cpp/models/ggml-vocab-" in member.name and member.name.endswith(".gguf"):
                    source = tar.extractfile(member)
                    assert source is not None
                    (cache / Path(member.name).name).write_bytes(source.read())
    return target if target.exists() else None


def find_gguf(file_name: str, cache: Path) -> Path:
    dirs = [Path(d) for d in os.environ.get("TOKENWIRE_GGUF_DIRS", "").split(os.pathsep) if d]
    store = default_store_path()
    for folder in [*dirs, store / ".cache"]:
        if (folder / file_name).is_file():
            return folder / file_name
    for link in store.glob("*/source.gguf"):
        if link.resolve().name == file_name:
            return link.resolve()
    found = _sdist_vocab(file_name, cache) if file_name.startswith("ggml-vocab-") else None
    if found is None:
        pytest.fail(f"{file_name} not found in $TOKENWIRE_GGUF_DIRS or {store}/.cache (ggml-vocab-* come from "
                    "the llama-cpp-python source archive, gemma/qwen from their `tokenwire pull`)")
    return found


@pytest.mark.slow
def test_smollm2_gguf_tokenizes_as_llama_cpp(tmp_path: Path) -> None:
    entry = ENTRIES[STORE_FILE]
    summary = check_against_llama_cpp(entry, find_gguf(entry["file"], tmp_path / "vocab"), tmp_path / "out")
    assert summary["turn_end_token_ids"] == [2]  # <|im_end|> ends SmolLM2's turns
    bundle = TokenizerBundle(tmp_path / "out")
    assert bundle.has_chat_template and 2 in bundle.eos_token_ids


@pytest.mark.gguf_files
@pytest.mark.parametrize("name", OTHER_FILES)
def test_recorded_gguf_files_tokenize_as_llama_cpp(name: str, tmp_path_factory) -> None:
    entry = ENTRIES[name]
    out = tmp_path_factory.mktemp("out")
    check_against_llama_cpp(entry, find_gguf(entry["file"], tmp_path_factory.getbasetemp() / "vocab"), out)
    if entry["file"].startswith("gemma-3"):  # transformers 4.57 made "capital" into "▁c ap it al"
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        assert tok.encode("The capital", add_special_tokens=False).tokens == ["The", "▁capital"]


def test_prompts_start_with_one_bos_where_the_file_asks(fixture_dir: Path, tmp_path: Path) -> None:
    """llama.cpp starts every prompt of an add_bos_token file with BOS (gemma, llama): once, also
    when the chat template writes it itself; a file without it gets none."""
    spm = tmp_path / "spm"
    write_tokenizer(write_fixture("spm", fixture_dir), spm)
    config = json.loads((spm / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["prompt_starts_with_bos"] is True
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (spm / "tokenizer_config.json").write_text(json.dumps(config))
    bundle = TokenizerBundle(spm)
    bos = bundle.tokenizer.token_to_id(bundle.bos_token)
    plain = bundle.tokenizer.encode("Hello world", add_special_tokens=False).ids
    assert bundle.encode("Hello world") == [bos, *plain]
    chat = bundle.encode_chat([{"role": "user", "content": "Hello world"}], add_generation_prompt=False)
    assert chat[0] == bos and chat.count(bos) == 1
    bpe = tmp_path / "bpe"
    write_tokenizer(write_fixture("bpe-qwen2", fixture_dir), bpe)
    bundle = TokenizerBundle(bpe)
    assert bundle.encode("Hello world") == bundle.tokenizer.encode("Hello world", add_special_tokens=False).ids
