"""Fine-tuning examples from JSON Lines files or the rows of a Hugging Face dataset (hf:<dir>, read as
pretraining's hf: sources are), each checked where it is read; a bad one is a ConfigError that names its file and
line, or its dataset and row.

SFT: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} or {"prompt", "response"}.
DPO: {"prompt", "chosen", "rejected"}; the prompt is a string (one user turn) or a list of messages, and each
answer a string (one assistant turn) or a list of assistant messages.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from jaxscale.data.config import DataConfig
from jaxscale.data.errors import DataError
from jaxscale.data.sources import load_hf_dataset, resolve_source
from jaxscale.errors import ConfigError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    where: str  # "file:line" or "<dataset> row <index>", for errors
    messages: tuple[dict, ...]
    key: str  # a hash of the content: which examples are held out


@dataclass(frozen=True)
class Preference:
    where: str
    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]
    key: str


def example_records(spec: str, setting: str, split: str, split_setting: str):
    """(where, record) for every example of `spec`: each non-blank line of the JSONL files it names (a path or
    a glob; where = "file:line"), or each row of the Hugging Face dataset of an hf:<dir> spec (where = "<dir>
    row <index>", a row's empty (None) columns left out, as a JSON line leaves out a field). `split` is the
    split read from a dataset that holds several, `split_setting` the setting that names it."""
    try:
        source = resolve_source(spec, DataConfig(), setting)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if source.kind == "hf":
        try:
            dataset, name = load_hf_dataset(source.files[0][1], split, f"{setting}={spec}", split_setting)
        except DataError as e:
            raise ConfigError(f"{setting}={spec!r}: {e}") from None
        for index, row in enumerate(dataset):
            yield f"{name} row {index}", {key: value for key, value in row.items() if value is not None}
        return
    if source.kind != "text" or any(fmt not in ("text", "jsonl") for fmt, _ in source.files):
        raise ConfigError(f"{setting}={spec!r}: fine-tuning examples are JSON Lines files or hf:<dataset dir>, "
                          f"not {'the built-in corpus' if source.kind == 'builtin' else 'token or Parquet files'}")
    for _, path in source.files:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not valid JSON ({e.msg}); each line must hold one JSON object") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{where}: a JSON {type(record).__name__}, not an object")
                yield where, record


def _content_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _messages(value, where: str, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {field!r} must be a non-empty list of {{\"role\", \"content\"}} messages")
    checked = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ConfigError(f"{where}: {field}[{i}] is not an object with \"role\" and \"content\"")
        for name in ("role", "content"):
            if message.get(name) is None:  # a dataset's row gives the fields some messages lack as None
                raise ConfigError(f"{where}: {field}[{i}] has no {name!r}; each message needs \"role\" and "
                                  f"\"content\"")
        if message["role"] not in ROLES:
            raise ConfigError(f"{where}: {field}[{i}] has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ConfigError(f"{where}: {field}[{i}].content must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ConfigError(f"{where}: {field}[{i}] is an empty assistant response; there is nothing to train on")
        checked.append({"role": message["role"], "content": message["content"]})
    return tuple(checked)


def _text_field(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise ConfigError(f"{where}: no {name!r} field; found {', '.join(map(repr, record)) or 'none'}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {name!r} must be a non-empty string")
    return value


def read_conversations(spec: str, setting: str, split: str = "train",
                       split_setting: str = "posttrain.hf_split") -> list[Conversation]:
    out = []
    for where, record in example_records(spec, setting, split, split_setting):
        if "messages" in record:
            messages = _messages(record["messages"], where, "messages")
        elif "prompt" in record or "response" in record:
            messages = ({"role": "user", "content": _text_field(record, "prompt", where)},
                        {"role": "assistant", "content": _text_field(record, "response", where)})
        else:
            raise ConfigError(f"{where}: neither \"messages\" nor \"prompt\" and \"response\"; an SFT example is "
                              f"one of those")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant message; the loss is on the assistant's tokens only")
        out.append(Conversation(where, messages, _content_key(record)))
    return out


def _answer(record: dict, name: str, where: str) -> tuple[dict, ...]:
    if name not in record:
        raise ConfigError(f"{where}: no {name!r} field; a preference example has \"prompt\", \"chosen\" and "
                          f"\"rejected\"")
    if isinstance(record[name], list):
        messages = _messages(record[name], where, name)
        if any(m["role"] != "assistant" for m in messages):
            raise ConfigError(f"{where}: {name!r} may hold assistant messages only; the prompt goes in \"prompt\"")
        return messages
    return ({"role": "assistant", "content": _text_field(record, name, where)},)


def read_preferences(spec: str, setting: str, split: str = "train",
                      split_setting: str = "posttrain.hf_split") -> list[Preference]:
    out = []
    for where, record in example_records(spec, setting, split, split_setting):
        if "prompt" not in record:
            raise ConfigError(f"{where}: no 'prompt' field; a preference example has \"prompt\", \"chosen\" and "
                              f"\"rejected\"")
        prompt = record["prompt"]
        prompt = (_messages(prompt, where, "prompt") if isinstance(prompt, list)
                  else ({"role": "user", "content": _text_field(record, "prompt", where)},))
        out.append(Preference(where, prompt, _answer(record, "chosen", where), _answer(record, "rejected", where),
                              _content_key(record)))
    return out


def held_out(key: str, fraction: float) -> bool:
    """Whether an example goes to validation: its content hash, read as a number in [0, 1), below `fraction`."""
    return int(key[:12], 16) / 16 ** 12 < fraction
