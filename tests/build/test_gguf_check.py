"""`tokenwire check`: a GGUF import's served graph against the file's float reference.

The figures are checked against a plain computation over two logit arrays; the end-to-end tests
import tiny fixtures (tests/gguf_fixtures.py) through `import_gguf` and read what lands in the
manifest, including a model checked against the wrong file, which must score badly."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import gguf_fixture

from tokenwire.server.build import gguf_check
from tokenwire.server.build.gguf_check import CheckError, check_model, compare_streams, format_table, plan
from tokenwire.server.build.importer import import_gguf
from tokenwire.server.models.store import ModelStore, read_manifest

QTYPES = {"linear": "Q4_K", "ffn_down": "Q6_K", "attn_v": "Q8_0", "token_embd": "Q8_0"}
TOKENS = 160


def plain_measures(ref: np.ndarray, cand: np.ndarray, tokens: list[int]) -> dict[str, float]:
    """The measures written out position by position."""
    same = kl = ref_nll = cand_nll = 0.0
    for t in range(len(tokens) - 1):
        p = np.exp(ref[t] - ref[t].max()); p /= p.sum()  # noqa: E702
        c = np.exp(cand[t] - cand[t].max()); c /= c.sum()  # noqa: E702
        same += float(p.argmax() == c.argmax())
        kl += float(np.sum(p * (np.log(p) - np.log(c))))
        ref_nll -= float(np.log(p[tokens[t + 1]]))
        cand_nll -= float(np.log(c[tokens[t + 1]]))
    n = len(tokens) - 1
    return {"tokens": n + 1, "top1_agreement": same / n, "mean_kl": kl / n,
            "perplexity_reference": float(np.exp(ref_nll / n)), "perplexity": float(np.exp(cand_nll / n))}


def chunks(a: np.ndarray, rows: int):
    return (a[i:i + rows] for i in range(0, len(a), rows))


def test_compare_streams_equals_the_plain_measures() -> None:
    rng = np.random.default_rng(0)
    ref = (3 * rng.standard_normal((300, 50))).astype(np.float32)
    cand = ref + rng.standard_normal(ref.shape).astype(np.float32)
    tokens = [int(t) for t in rng.integers(0, 50, 300)]
    want = plain_measures(ref.astype(np.float64), cand.astype(np.float64), tokens)
    for rows in (7, 256, 300):
        got = compare_streams(chunks(ref, rows), chunks(cand, rows), tokens)
        assert got["tokens"] == 300
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9), key
    assert 0.3 < want["top1_agreement"] < 1.0 and want["mean_kl"] > 0.01
    same = compare_streams(chunks(ref, 64), chunks(ref.copy(), 64), tokens)
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-12
    assert same["perplexity"] == pytest.approx(same["perplexity_reference"])
    with pytest.raises(ValueError):
        compare_streams(chunks(ref, 64), chunks(cand[:, :40], 64), tokens)
    with pytest.raises(ValueError):  # the served stream stops early
        compare_streams(chunks(ref, 64), chunks(cand, 64), tokens + [1])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def imported(store: ModelStore) -> dict[str, Path]:
    """Two fixtures imported with the check on (cut to TOKENS tokens), one with it off."""
    folders = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_check, "IMPORT_MAX_TOKENS", TOKENS)
        for arch in ("llama", "gemma2"):
            folders[arch] = import_gguf(gguf_fixture(arch, qtypes=QTYPES), store, name=f"tiny-{arch}",
                                        progress=lambda _: None).folder
    folders["unchecked"] = import_gguf(gguf_fixture("qwen3", qtypes=QTYPES), store, name="tiny-qwen3",
                                       check=False, progress=lambda _: None).folder
    return folders


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_import_records_the_check(imported: dict[str, Path], arch: str) -> None:
    q = read_manifest(imported[arch])["quality"]
    assert q["tokens"] == TOKENS and q["text_tokens"] > TOKENS and not q["shortened"]
    # the served graph computes the file's own blocks: it agrees with the float reference
    assert q["top1_agreement"] >= 0.99 and q["mean_kl"] < 1e-3
    assert q["perplexity"] == pytest.approx(q["perplexity_reference"], rel=1e-2)
    assert "gguf_reference" in q["reference"]
    assert "quality" not in read_manifest(imported["unchecked"])


def test_check_against_the_wrong_file_fails(imported: dict[str, Path], tmp_path: Path) -> None:
    """The same model folder checked against another file's weights (another seed) scores badly."""
    import shutil

    folder = tmp_path / "wrong"
    shutil.copytree(imported["llama"], folder, symlinks=True)
    (folder / "source.gguf").unlink()
    (folder / "source.gguf").symlink_to(gguf_fixture("llama", qtypes=QTYPES, seed=5))
    q = check_model(folder, max_tokens=100, write=False)
    assert q["top1_agreement"] < 0.5 and q["mean_kl"] > 0.5


def test_cli_check(imported: dict[str, Path], store: ModelStore) -> None:
    from tokenwire.clients.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["check", "tiny-qwen3:q4_k_m", "--max-tokens", "80", "--json", "--models-dir", str(store.root)]) == 0
    q = json.loads(out.getvalue())
    assert q["tokens"] == 80 and q["top1_agreement"] >= 0.99
    assert read_manifest(imported["unchecked"])["quality"] == q
    table = format_table("tiny-qwen3:q4_k_m", q)
    assert "top-1 agreement" in table and f"{q['top1_agreement']:.2%}" in table


def test_plan_shortens_and_says_why(imported: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = imported["gemma2"]
    source = gguf_check.source_gguf(folder)
    whole = plan(folder, source, max_tokens=1000, memory=0)
    assert len(whole.tokens) == 1000 and whole.shortened_because == ""
    monkeypatch.setattr(gguf_check, "REFERENCE_FLOP_BUDGET", 2 * 1_000_000 * 300.0)
    by_time = plan(folder, source, max_tokens=1000, memory=0)
    assert 64 <= len(by_time.tokens) < 1000 and by_time.shortened_because.startswith("time:")
    monkeypatch.undo()
    fixed, per_token = gguf_check.reference_memory(gguf_check.GGUFFile(source))
    by_memory = plan(folder, source, max_tokens=1000, memory=2 * (fixed + 300 * per_token))
    assert len(by_memory.tokens) == 300 and "memory:" in by_memory.shortened_because
    with pytest.raises(CheckError, match="too big"):
        plan(folder, source, max_tokens=1000, memory=1 << 20)


def test_not_a_gguf_import(tmp_path: Path) -> None:
    (tmp_path / "tokenwire.json").write_text(json.dumps({"id": "x:fp32", "source": {"kind": "onnx"}}))
    with pytest.raises(CheckError, match="not imported from a GGUF"):
        gguf_check.source_gguf(tmp_path)
