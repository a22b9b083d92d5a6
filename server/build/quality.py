"""How far a quantized model strays from its fp32 original, teacher-forced over a fixed text.

Both models see the same tokens (the fixed text, >= 2,000 tokens); at every position we
compare their next-token distributions: how often the top-1 token agrees, the mean KL
divergence KL(fp32 || quantized), and each model's perplexity on the text.

Run: python -m tokenwire.server.build.quality REFERENCE_DIR CANDIDATE_DIR [--write]
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import numpy as np

from tokenwire.server.engine.optimum_engine import OptimumEngine
from tokenwire.server.engine.sampling import log_softmax
from tokenwire.server.engine.tokenizer import TokenizerBundle
from tokenwire.server.models.store import read_manifest, write_manifest

MIN_TOKENS = 2000
DEFAULT_MAX_TOKENS = 2048


def eval_text() -> str:
    return resources.files("tokenwire.server.build").joinpath("data/eval_text.txt").read_text()


def _fast_graph_logits(reference: Path, candidate: Path, tokens: list[int], kernels: str | None) -> np.ndarray:
    """Every position's logits of a fast graph (which computes only the last position).

    Its evaluation twin is rebuilt from the same fp32 weights with every position kept; the
    twin must reproduce the candidate's own last-position logits on a probe before we trust it.
    """
    import tempfile

    from tokenwire.server.engine.fast_engine import FastEngine

    from .fast_graph import build_fast_graph, full_logits

    engine = FastEngine(candidate, context_length=len(tokens) + 1, kernels=kernels)
    native = engine.kernels == "native"
    kv_dtype = "float32" if native else np.dtype(engine.dtype).name  # the native graph's cache: its kv_format
    kv_format = "int8" if engine.dtype == np.uint8 else "float16"
    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp)
        build_fast_graph(reference, twin, last_only=False, kv_dtype=kv_dtype, native=native, kv_format=kv_format)
        logits = full_logits(twin, tokens, native=native)
    probe = 64
    own = engine.prefill(engine.new_prefill(), tokens[:probe])
    diff = float(np.abs(own - logits[probe - 1]).max())
    if diff > 1e-3:
        raise ValueError(f"the evaluation twin differs from {candidate} by {diff}: rebuild the model")
    return logits


def compare(reference: Path, candidate: Path, max_tokens: int = DEFAULT_MAX_TOKENS,
            kernels: str | None = None) -> dict[str, float]:
    """`kernels` picks a fast graph's linear kernels (engine.graph.choose_kernels)."""
    return compare_kernels(reference, candidate, [kernels], max_tokens)[0]


def compare_kernels(reference: Path, candidate: Path, kernels: list[str | None],
                    max_tokens: int = DEFAULT_MAX_TOKENS) -> list[dict[str, float]]:
    """`compare` for each kernel choice, with the fp32 reference computed once."""
    tokens = TokenizerBundle(reference).encode(eval_text())[:max_tokens]
    if len(tokens) < MIN_TOKENS and max_tokens >= MIN_TOKENS:
        raise ValueError(f"evaluation text has {len(tokens)} tokens, fewer than {MIN_TOKENS}")
    from tokenwire.server.engine.graph import is_fast_graph

    ref_logits = OptimumEngine(reference / "model.onnx").full_logits(tokens)
    results = []
    for kind in kernels:
        if is_fast_graph(candidate):
            cand_logits = _fast_graph_logits(reference, candidate, tokens, kind)
        else:
            cand_logits = OptimumEngine(candidate / "model.onnx").full_logits(tokens)
        results.append(_agreement(ref_logits, cand_logits, tokens))
    return results


class Agreement:
    """The measures' running totals, fed some positions at a time (logits [n, V] of both models and
    the n tokens that followed), so neither model's logits of a long text need be held whole."""

    def __init__(self) -> None:
        self.positions = 0
        self.same = self.kl_sum = self.ref_nll = self.cand_nll = 0.0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> None:
        lp_ref = log_softmax(np.asarray(ref_logits, dtype=np.float64))
        lp_cand = log_softmax(np.asarray(cand_logits, dtype=np.float64))
        self.same += float((lp_ref.argmax(-1) == lp_cand.argmax(-1)).sum())
        self.kl_sum += float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())
        rows = np.arange(len(targets))
        self.ref_nll -= float(lp_ref[rows, targets].sum())
        self.cand_nll -= float(lp_cand[rows, targets].sum())
        self.positions += len(targets)

    def result(self) -> dict[str, float]:
        n = self.positions
        return {
            "tokens": n + 1,
            "top1_agreement": self.same / n,
            "mean_kl": self.kl_sum / n,
            "perplexity_reference": float(np.exp(self.ref_nll / n)),
            "perplexity": float(np.exp(self.cand_nll / n)),
        }


def _agreement(ref_logits: np.ndarray, cand_logits: np.ndarray, tokens: list[int]) -> dict[str, float]:
    targets = np.asarray(tokens[1:])
    totals = Agreement()
    for start in range(0, len(targets), 256):
        stop = min(start + 256, len(targets))
        totals.add(ref_logits[start:stop], cand_logits[start:stop], targets[start:stop])
    return totals.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="fp32 model folder")
    parser.add_argument("candidate", type=Path, help="quantized model folder")
    parser.add_argument("--write", action="store_true", help="record the figures in the candidate's manifest")
    parser.add_argument("--kernels", choices=["auto", "native", "onnxruntime"], default=None,
                        help="a fast graph's linear kernels (default: TOKENWIRE_KERNELS, else auto)")
    args = parser.parse_args()
    result = compare(args.reference, args.candidate, kernels=args.kernels)
    print(json.dumps(result, indent=2))
    if args.write:
        manifest = read_manifest(args.candidate)
        manifest["quality"] = {**result, "reference": read_manifest(args.reference).get("id", str(args.reference))}
        write_manifest(args.candidate, manifest)


if __name__ == "__main__":
    main()
