"""A model's `config.json`, parsed once: the shape facts every layer needs.

The engine lays out KV buffers from it, the graph builder reads the same numbers, the store
records the context length and the kernels check what they can run. Names differ between
families (llama's `num_attention_heads` is gpt2's `n_head`); this is the one place that knows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The context window assumed when config.json declares none (and every reader agrees on it).
DEFAULT_CONTEXT_LENGTH = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _first_int(config: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = ""
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    declared_context: int = 0  # 0: config.json names no context length
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def context_length(self) -> int:
        """The context window: what config.json declares, else DEFAULT_CONTEXT_LENGTH."""
        return self.declared_context or DEFAULT_CONTEXT_LENGTH

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
        hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
        kv_heads = _first_int(config, "num_key_value_heads", "n_head_kv", "num_kv_heads") or heads
        head_dim = _first_int(config, "head_dim") or (hidden // heads if heads else 0)
        return cls(
            model_type=str(config.get("model_type", "")),
            layers=_first_int(config, "num_hidden_layers", "n_layer", "num_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            intermediate_size=_first_int(config, "intermediate_size", "n_inner", "ffn_dim"),
            vocab_size=_first_int(config, "vocab_size"),
            declared_context=_first_int(config, *_CONTEXT_KEYS),
            raw=dict(config),
        )

    @classmethod
    def read(cls, folder: Path) -> ModelConfig:
        """Parses `folder/config.json`; raises OSError or ValueError when it is missing or not JSON."""
        data = json.loads((Path(folder) / "config.json").read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{folder / 'config.json'} is not a JSON object")
        return cls.from_dict(data)

    @classmethod
    def read_or_empty(cls, folder: Path) -> ModelConfig:
        """As read(), but an empty config (every number 0) when the file is missing or unreadable."""
        try:
            return cls.read(folder)
        except (OSError, ValueError):
            return cls()
