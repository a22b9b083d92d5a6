"""Sentence embeddings from an ONNX encoder (a BERT-style model exported by optimum's
feature-extraction task): tokenize, run the encoder on a padded batch, pool (mean over the real
tokens, or the first token), normalise (L2) as the model's sentence-transformers configuration says.

The model folder's manifest holds `"kind": "embedding"` and an `embedding` section:
{"pooling": "mean" | "cls", "normalize": bool, "dimensions": int, "max_tokens": int}.
An Embedder stands where a decoder's Scheduler stands for the model manager: `busy`, `stop()`,
no KV cache.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .session import make_session

BATCH = 32  # texts per encoder run


class EmbeddingError(ValueError):
    """A request the embedding model cannot answer as asked (the message says why)."""

    def __init__(self, message: str, field: str = "input") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EmbeddingSpec:
    pooling: str = "mean"
    normalize: bool = True
    dimensions: int = 0
    max_tokens: int = 512

    @classmethod
    def of(cls, manifest: dict) -> EmbeddingSpec:
        raw = manifest.get("embedding", {})
        return cls(pooling=str(raw.get("pooling", "mean")), normalize=bool(raw.get("normalize", True)),
                   dimensions=int(raw.get("dimensions", 0)), max_tokens=int(raw.get("max_tokens", 512)))


def pool(hidden: np.ndarray, mask: np.ndarray, spec: EmbeddingSpec) -> np.ndarray:
    """[batch, tokens, dims] hidden states and their attention mask -> [batch, dims] float32."""
    if spec.pooling == "cls":
        pooled = hidden[:, 0, :].astype(np.float64)
    else:
        weights = mask.astype(np.float64)[:, :, None]
        pooled = (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if spec.normalize:
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)


class Embedder:
    def __init__(self, folder: Path, device: str = "cpu", threads: int = 0) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.spec = EmbeddingSpec.of(json.loads((folder / "tokenwire.json").read_text()))
        self.session = make_session(folder / "model.onnx", device=device, threads=threads)
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.spec.max_tokens)
        self.tokenizer.no_padding()
        self._lock = threading.Lock()
        self._active = 0
        self.kv_bytes = 0  # an encoder keeps no cache between requests

    @property
    def busy(self) -> bool:
        return self._active > 0

    def stop(self) -> None:
        self.session = None  # type: ignore[assignment]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str], dimensions: int = 0) -> tuple[np.ndarray, int]:
        """The embeddings of `texts` ([len(texts), dims] float32) and the tokens they took (each
        text truncated to the model's max_tokens). `dimensions` below the model's own keeps the first
        ones, normalised again (as OpenAI's and Ollama's `dimensions` do; a model not trained for it,
        as all-MiniLM-L6-v2 was not, loses more quality than one that was)."""
        native = self.spec.dimensions
        if dimensions > native:
            raise EmbeddingError(f"this model makes {native}-dimensional embeddings; dimensions {dimensions} "
                                 f"is more than it has", "dimensions")
        with self._lock:
            self._active += 1
        try:
            out, tokens = [], 0
            for start in range(0, len(texts), BATCH):
                vectors, used = self._run(texts[start:start + BATCH])
                out.append(vectors)
                tokens += used
            vectors = np.concatenate(out) if out else np.zeros((0, native), np.float32)
            if dimensions and dimensions < native:  # shortened: the first `dimensions`, normalised again
                vectors = vectors[:, :dimensions]
                if self.spec.normalize:
                    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return vectors.astype(np.float32), tokens
        finally:
            with self._lock:
                self._active -= 1

    def _run(self, texts: list[str]) -> tuple[np.ndarray, int]:
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        types = np.zeros((len(texts), width), np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
            types[row, : len(e.ids)] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        session = self.session
        if session is None:
            raise RuntimeError("the embedding model was unloaded")
        (hidden, *_) = session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})
        return pool(hidden, mask, self.spec), int(mask.sum())
