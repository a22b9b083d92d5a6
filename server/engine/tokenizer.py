"""The model's tokenizer, chat template and stop tokens, read from its folder."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered by the model's template (e.g. roles out of order)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


class TokenizerBundle:
    def __init__(self, folder: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")
        tok_config = _read_json(folder / "tokenizer_config.json")
        eos: set[int] = set()
        for source in (gen_config, config):
            value = source.get("eos_token_id")
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(int(v) for v in value)
        self.eos_token_ids = eos
        self.bos_token = _token_text(tok_config.get("bos_token"))
        self.eos_token = (
            self.tokenizer.id_to_token(min(eos)) if eos else _token_text(tok_config.get("eos_token"))
        ) or ""
        template = ""
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif isinstance(tok_config.get("chat_template"), str):
            template = tok_config["chat_template"]
        self.chat_template_source = template
        self._template = None
        if template:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(template)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            # No template (e.g. a base model): a plain transcript the model can continue.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        # Chat-templated text already carries its special tokens; the post-processor's BOS
        # (for SmolLM2 a stray <|im_start|>) would only be noise, so never add it.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
