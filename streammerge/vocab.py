"""Vocabularies: each input's tokens, the output vocabulary a tokenizer source builds (the base's,
one model's, or the union), and which row of each input's embedding feeds each output row.

Imports errors and index. SEMANTICS §3.6: a token an input lacks takes the default row —
the only holder's, else the base's, else the average of the holders' — or zeros if no input
has it. Reads tokenizer.json only (Hugging Face fast tokenizers); other formats are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class Vocab:
    """The tokens of one model whose ids fall inside its embedding rows."""

    tokens: dict[str, int]
    tokenizer: dict[str, Any]  # tokenizer.json, parsed


@dataclass(frozen=True)
class VocabRows:
    """For one vocabulary tensor: per input, the row feeding each output row (-1: take the default)."""

    rows: tuple[tuple[int, ...], ...]
    defaults: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (output row, ((input, row), ...) averaged)
    pad: int = 0  # rows after the vocabulary: each input's mean real row (pad_to_multiple_of)

    def is_identity(self) -> bool:
        return not self.defaults and not self.pad and all(r == tuple(range(len(r))) for r in self.rows)


def read_vocab(folder: str, rows: int) -> Vocab:
    """The tokens (with ids below `rows`) of the tokenizer in `folder`."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path) as f:
            tok = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the tokenizer ({e}); merging vocabularies needs each model's "
                         "tokenizer.json") from e
    tokens: dict[str, int] = {}
    model = tok.get("model", {})
    vocab = model.get("vocab", {})
    if isinstance(vocab, list):  # Unigram: [[token, score], ...]
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    for t, i in vocab.items():
        if i < rows:
            tokens.setdefault(t, i)
    for added in tok.get("added_tokens", []):
        if added["id"] < rows:
            tokens.setdefault(added["content"], added["id"])
    return Vocab(tokens, tok)


def output_tokens(vocabs: list[Vocab], source: str | int, base: int) -> list[str]:
    """The output vocabulary in id order: `source` is "union", "base" or an input position."""
    def in_order(v: Vocab) -> list[str]:
        return sorted(v.tokens, key=v.tokens.__getitem__)

    if source == "base":
        return in_order(vocabs[base])
    if isinstance(source, int):
        return in_order(vocabs[source])
    out = in_order(vocabs[base])
    seen = set(out)
    for k, v in enumerate(vocabs):
        if k != base:
            for t in in_order(v):
                if t not in seen:
                    out.append(t)
                    seen.add(t)
    return out


def align(vocabs: list[Vocab], tokens: list[str], base: int) -> tuple[VocabRows, list[str]]:
    """Rows per input for `tokens`, and the tokens no input has (their rows are zeros)."""
    rows = tuple(tuple(v.tokens.get(t, -1) for t in tokens) for v in vocabs)
    defaults = []
    orphans = []
    for j, t in enumerate(tokens):
        holders = [k for k in range(len(vocabs)) if rows[k][j] >= 0]
        if len(holders) == len(vocabs):
            continue
        if len(holders) == 1:
            pick = holders
        elif base in holders:
            pick = [base]
        else:
            pick = holders  # several models but not the base: their average
        if not holders:
            orphans.append(t)
        defaults.append((j, tuple((k, rows[k][j]) for k in pick)))
    return VocabRows(rows, tuple(defaults)), orphans


def output_tokenizer(template: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """`template` (the base's tokenizer.json) with the tokens it lacks appended as added tokens."""
    tok = json.loads(json.dumps(template))
    have = set(read_vocab_dict(tok))
    added = tok.setdefault("added_tokens", [])
    assert isinstance(added, list)
    for j, t in enumerate(tokens):
        if t not in have:
            added.append({"id": j, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": False})
    return tok


def read_vocab_dict(tok: dict[str, Any]) -> dict[str, int]:
    """Every token of a parsed tokenizer.json with its id (vocabulary and added tokens)."""
    model = tok.get("model", {})
    vocab = model.get("vocab", {}) if isinstance(model, dict) else {}
    out = dict(vocab) if isinstance(vocab, dict) else {e[0]: i for i, e in enumerate(vocab)}
    for a in tok.get("added_tokens", []) or []:
        out.setdefault(a["content"], a["id"])
    return out


def override(rows: VocabRows, configured: dict[int, tuple[tuple[tuple[int, int], ...], bool]], pad: int) -> VocabRows:
    """`rows` with configured sources per output row ((input, row) pairs; empty = zeros) and
    whether they are forced on every input, and `pad` padding rows."""
    per_input = [list(r) for r in rows.rows]
    defaults = dict(rows.defaults)
    for j, (sources, force) in configured.items():
        defaults[j] = sources
        if force:
            for r in per_input:
                r[j] = -1
    kept = {j: d for j, d in defaults.items() if j in configured or any(r[j] < 0 for r in per_input)}
    return VocabRows(tuple(tuple(r) for r in per_input), tuple(sorted(kept.items())), pad)
