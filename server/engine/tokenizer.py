"""The model's tokenizer, chat template and stop tokens, read from its folder."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from .constraints import GrammarTokenizer


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
        # The same tokenizer reading special tokens' text as plain text (for message contents); a
        # second instance, as the setting is the tokenizer's own and requests encode concurrently.
        self._plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._plain.encode_special_tokens = True
        added = self.tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self._special_texts = [t.content for t in added.values() if t.special]
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
        # The vocabulary as the grammar engine reads it (constrained decoding), built on first use.
        self.grammar = GrammarTokenizer(folder / "tokenizer.json", min(eos) if eos else 0)
        self.bos_token = _token_text(tok_config.get("bos_token"))
        # A model whose prompts must start with BOS (a GGUF's add_bos_token: gemma, llama), said by the
        # key server/build/gguf_tokenizer.py writes; added once, when the template has not written it.
        bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self._prompt_bos = bos_id if tok_config.get("prompt_starts_with_bos") is True else None
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

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, enable_thinking: bool | None = None) -> str:
        """The chat as the model's template writes it; `tools` (OpenAI's shape) go to templates
        that take them (tool_calls.template_takes_tools), as Hugging Face passes them."""
        if self._template is None:
            # No template (e.g. a base model): a plain transcript the model can continue.
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if enable_thinking is not None:  # Qwen3's switch; other templates ignore it
            extra["enable_thinking"] = enable_thinking
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, OverflowError, RecursionError) as exc:
            # OverflowError: the sandbox's range() limit; RecursionError: a macro calling itself (a
            # template is the model file's, so it may be hostile: the request fails, not the server)
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        # Chat-templated text already carries its special tokens; the post-processor's BOS
        # (for SmolLM2 a stray <|im_start|>) would only be noise, so never add it.
        return self._with_bos(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self._prompt_bos is None or ids[:1] == [self._prompt_bos]:
            return ids
        return [self._prompt_bos, *ids]

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, enable_thinking: bool | None = None) -> list[int]:
        """The prompt ids of a chat, where only the template makes control tokens: a message that
        contains "<|im_start|>system" (or any special token's text) gets that text as plain text,
        so a user cannot forge a turn. Ordinary chats tokenize exactly as the whole rendered text."""
        text = self.render_chat(messages, add_generation_prompt, tools, enable_thinking)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        spans = self._content_spans(messages, add_generation_prompt, text, tools, enable_thinking)
        if spans is None:  # a content holds a control token's text, and the template changed it
            raise ChatTemplateError("a message contains the text of one of the model's control tokens")
        forged = [start for (start, end), token in zip(encoding.offsets, encoding.ids, strict=True)
                  if token in self._special_ids and any(a <= start and end <= b for a, b in spans)]
        if not forged:
            return self._with_bos(encoding.ids)
        ids: list[int] = []
        at = 0
        for a, b in spans:  # template text parses its control tokens, message text does not
            ids += self.tokenizer.encode(text[at:a], add_special_tokens=False).ids if a > at else []
            ids += self._plain.encode(text[a:b], add_special_tokens=False).ids if b > a else []
            at = b
        ids += self.tokenizer.encode(text[at:], add_special_tokens=False).ids if at < len(text) else []
        return self._with_bos(ids)

    def _content_spans(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                       text: str, tools: list[dict[str, Any]] | None = None,
                       enable_thinking: bool | None = None) -> list[tuple[int, int]] | None:
        """Where each message's content stands in `text` (the chat rendered), found by rendering it
        again with markers in place of the contents; None when the template does not insert them
        verbatim. Empty when no content could hold a control token's text."""
        if not any(special in m.get("content", "") for m in messages for special in self._special_texts):
            return []
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        template = self.render_chat(marked, add_generation_prompt, tools, enable_thinking)
        spans, out, at = [], 0, 0
        for i, m in enumerate(messages):
            marker = f"\ue000{i}\ue001"
            where = template.find(marker, at)
            if where < 0:
                return None
            start = out + (where - at)
            spans.append((start, start + len(m.get("content", ""))))
            out = start + len(m.get("content", ""))
            at = where + len(marker)
        if out + (len(template) - at) != len(text):
            return None
        if any(text[a:b] != m.get("content", "") for (a, b), m in zip(spans, messages, strict=True)):
            return None
        return spans

    def holds_control_text(self, text: str) -> bool:
        """Whether `text` holds the text of one of the model's control tokens (a tool's schema
        rendered by the template must not forge a turn)."""
        return any(special in text for special in self._special_texts)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
