"""Conversations -> token ids and a loss mask (True on the assistant's tokens), through a chat template.

The built-in template, for any tokenizer: "<role>: <content>" per message, a newline after system and user
turns, and the end-of-document token closing each assistant turn (trained, so the model learns to stop).
A Hugging Face template is the Jinja `chat_template` of a tokenizer_config.json; each assistant turn is found by
rendering the conversation up to it with the generation prompt and up to its end, and the text between the two
is what the loss sees. Each piece is tokenized by itself, so no token straddles a prompt/response boundary.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxscale.data.tokenizers import Tokenizer
from jaxscale.errors import ConfigError
from jaxscale.extras import require


class TemplateError(ValueError):
    """The template could not render a conversation; the caller names the example's file and line."""


class BuiltinTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _ids(self, text: str) -> np.ndarray:
        return self.tokenizer.encode_batch([text])[0].astype(np.int32)

    def tokenize(self, messages) -> tuple[np.ndarray, np.ndarray]:
        pieces = []
        for m in messages:
            pieces.append((self._ids(f"{m['role']}: "), False))
            trained = m["role"] == "assistant"
            pieces.append((self._ids(m["content"]), trained))
            end = np.array([self.tokenizer.eos_id], np.int32) if trained else self._ids("\n")
            pieces.append((end, trained))
        return _joined(pieces)

    def generation_prompt(self, messages) -> np.ndarray:
        """The tokens that ask the model for the next assistant turn."""
        ids, _ = self.tokenize(messages) if messages else (np.zeros(0, np.int32), None)
        return np.concatenate([ids, self._ids("assistant: ")])


class JinjaTemplate:
    def __init__(self, tokenizer: Tokenizer, source: str, template: str, special_tokens: dict[str, str]):
        jinja2 = require("jinja2", "chat", f"posttrain.chat_template={source}")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"posttrain.chat_template={source}: the chat_template is not valid Jinja "
                              f"(line {e.lineno}: {e.message})") from e
        self.tokenizer, self.special_tokens = tokenizer, special_tokens

    def render(self, messages, generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=generation_prompt,
                                        **self.special_tokens)
        except TemplateError:
            raise
        except Exception as e:  # whatever the template's own code raises
            raise TemplateError(f"{type(e).__name__}: {e}") from e

    def _ids(self, text: str) -> np.ndarray:
        return self.tokenizer.encode_batch([text])[0].astype(np.int32) if text else np.zeros(0, np.int32)

    def tokenize(self, messages) -> tuple[np.ndarray, np.ndarray]:
        full = self.render(messages)
        pieces, done = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(self.render(messages[:i], True)), len(self.render(messages[:i + 1]))
            if not (done <= start <= end <= len(full)):
                raise TemplateError(f"the rendering up to message {i} is not a prefix of the whole conversation's, "
                                    f"so its assistant tokens cannot be told apart")
            pieces += [(self._ids(full[done:start]), False), (self._ids(full[start:end]), True)]
            done = end
        pieces.append((self._ids(full[done:]), False))
        return _joined(pieces)

    def generation_prompt(self, messages) -> np.ndarray:
        return self._ids(self.render(messages, True))


def _joined(pieces) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int32)
    mask = np.concatenate([np.full(len(p), trained) for p, trained in pieces]).astype(bool)
    return ids, mask


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def load_template(name: str, tokenizer: Tokenizer):
    """"builtin", a tokenizer_config.json, or hf:<dir> (its tokenizer_config.json)."""
    if name == "builtin":
        return BuiltinTemplate(tokenizer)
    path = os.path.expanduser(name[3:] if name.startswith("hf:") else name)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"posttrain.chat_template={name}: {path} does not exist; give 'builtin', a "
                          f"tokenizer_config.json or hf:<dir of one>")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"posttrain.chat_template={name}: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    template = settings.get("chat_template") if isinstance(settings, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        raise ConfigError(f"posttrain.chat_template={name}: {path} has no chat_template; use "
                          f"posttrain.chat_template=builtin")
    special = {key: _token_text(settings.get(key)) for key in ("bos_token", "eos_token")}
    return JinjaTemplate(tokenizer, name, template, special)
