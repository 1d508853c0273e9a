"""Tokenized fine-tuning examples as fixed-size rows, random-access sources for the trainer (`RecordData`).

SFT: conversations are packed whole into rows of seq_len + 1 tokens, each into the first of the newest rows with
room for it; each has its own segment id (attention stays inside it) and its loss mask beside the tokens; the
rest of a row is padding with segment id 0 and mask 0. A conversation's first token is never a target, so no loss crosses from one
conversation into the next.
DPO: one pair per row, the chosen and the rejected conversation each padded to seq_len + 1 tokens, with the
reference model's log-probabilities of both responses (filled in by `attach_reference`).
"""
from __future__ import annotations

import numpy as np

from jaxscale.errors import ConfigError
from jaxscale.posttrain.chat import TemplateError
from jaxscale.posttrain.config import PosttrainConfig

PACKING_WINDOW = 64  # rows still open for shorter conversations


def encode(template, messages, where: str, row_tokens: int, truncate: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of one conversation, at most `row_tokens` long (or the error naming `where`)."""
    try:
        ids, mask = template.tokenize(messages)
    except TemplateError as e:
        raise ConfigError(f"{where}: the chat template failed to render this conversation: {e}") from e
    if len(ids) > row_tokens:
        if truncate == "none":
            raise ConfigError(f"{where}: {len(ids)} tokens, longer than a row of seq_len + 1 = {row_tokens}; set "
                              f"posttrain.truncate=prompt (drop the earliest tokens) or end (cut the end off), or "
                              f"raise model.seq_len")
        keep = slice(len(ids) - row_tokens, None) if truncate == "prompt" else slice(0, row_tokens)
        ids, mask = ids[keep], mask[keep]
    mask = mask.copy()
    mask[0] = False  # the first token is never a target (across a packing boundary it would be the previous's)
    if not mask.any():
        raise ConfigError(f"{where}: no assistant token left after posttrain.truncate={truncate} to {row_tokens} "
                          f"tokens; raise model.seq_len or use the other truncate rule")
    return ids, mask


class PackedConversations:
    """Rows {"tokens", "segment_ids", "loss_mask"}, each int32 (seq_len + 1,)."""

    def __init__(self, encoded: list[tuple[np.ndarray, np.ndarray]], row_tokens: int, pad_id: int):
        self.rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        free: list[int] = []  # tokens left in each row
        for ids, mask in encoded:
            # first fit among the newest rows (a bounded search keeps packing linear in the examples)
            start = max(0, len(free) - PACKING_WINDOW)
            row = next((r for r in range(start, len(free)) if free[r] >= len(ids)), None)
            if row is None:
                row = len(free)
                self.rows.append([])
                free.append(row_tokens)
            self.rows[row].append((ids, mask))
            free[row] -= len(ids)
        self.row_tokens, self.pad_id = row_tokens, pad_id
        self.conversations = len(encoded)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        tokens = np.full(self.row_tokens, self.pad_id, np.int32)
        segments = np.zeros(self.row_tokens, np.int32)
        mask = np.zeros(self.row_tokens, np.int32)
        at = 0
        for number, (ids, trained) in enumerate(self.rows[index], 1):
            tokens[at:at + len(ids)], segments[at:at + len(ids)], mask[at:at + len(ids)] = ids, number, trained
            at += len(ids)
        return {"tokens": tokens, "segment_ids": segments, "loss_mask": mask}

    def describe(self) -> str:
        filled = sum(len(ids) for row in self.rows for ids, _ in row) / max(1, len(self.rows) * self.row_tokens)
        return f"{self.conversations:,} conversations in {len(self):,} rows ({filled:.0%} of their tokens used)"


class PreferencePairs:
    """Rows {"chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask"} (int32, seq_len + 1) and
    {"reference_chosen", "reference_rejected"} (float32 scalars: log-probabilities of the responses)."""

    def __init__(self, pairs: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
                 row_tokens: int, pad_id: int):
        def padded(arrays):
            out = np.full((len(arrays), row_tokens), pad_id, np.int32)
            masks = np.zeros((len(arrays), row_tokens), np.int32)
            for i, (ids, mask) in enumerate(arrays):
                out[i, :len(ids)], masks[i, :len(ids)] = ids, mask
            return out, masks

        self.chosen, self.chosen_mask = padded([c for c, _ in pairs])
        self.rejected, self.rejected_mask = padded([r for _, r in pairs])
        self.reference = np.zeros((len(pairs), 2), np.float32)

    def attach_reference(self, reference: np.ndarray) -> None:
        """The reference model's (chosen, rejected) log-probabilities, one row per pair."""
        self.reference = np.asarray(reference, np.float32).reshape(len(self), 2)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"chosen_tokens": self.chosen[index], "chosen_mask": self.chosen_mask[index],
                "rejected_tokens": self.rejected[index], "rejected_mask": self.rejected_mask[index],
                "reference_chosen": self.reference[index, 0], "reference_rejected": self.reference[index, 1]}

    def describe(self) -> str:
        return f"{len(self):,} preference pairs"


def split(examples: list, fraction: float, validation: list | None):
    """(train, held-out): a separate validation file's examples, or those whose content hash falls below
    `fraction`."""
    from jaxscale.posttrain.records import held_out

    if validation is not None:
        return examples, validation
    return ([e for e in examples if not held_out(e.key, fraction)], [e for e in examples if held_out(e.key, fraction)])


def build_rows(cfg: PosttrainConfig, template, row_tokens: int, pad_id: int):
    """(train rows, held-out rows or None) for the configured method."""
    from jaxscale.posttrain.records import read_conversations, read_preferences

    read = read_conversations if cfg.method == "sft" else read_preferences
    validation = (read(cfg.validation_source, "posttrain.validation_source", cfg.validation_hf_split,
                       "posttrain.validation_hf_split") if cfg.validation_source else None)
    train, held = split(read(cfg.source, "posttrain.source", cfg.hf_split, "posttrain.hf_split"),
                        cfg.validation_fraction, validation)
    if not train:
        raise ConfigError(f"posttrain.source={cfg.source!r}: no training examples (all {len(held)} held out); "
                          f"lower posttrain.validation_fraction")

    def rows(examples):
        if not examples:
            return None
        if cfg.method == "sft":
            return PackedConversations([encode(template, e.messages, e.where, row_tokens, cfg.truncate)
                                        for e in examples], row_tokens, pad_id)
        return PreferencePairs([(encode(template, e.prompt + e.chosen, e.where, row_tokens, cfg.truncate),
                                 encode(template, e.prompt + e.rejected, e.where, row_tokens, cfg.truncate))
                                for e in examples], row_tokens, pad_id)

    return rows(train), rows(held)
