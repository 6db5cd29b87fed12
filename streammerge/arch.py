"""Layer structure of a decoder-only checkpoint, read from its tensor names.

Imports errors and index. The first `.N.` in a name marks a layer (mergekit's rule for
inferred architectures); names without one are pre-weights (embeddings) or post-weights
(final norm, heads). Output order is the natural one (SEMANTICS deviation 5): pre-weights,
layers 0, 1, 2, ..., post-weights with heads last, so reads stream through inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlanError
from .index import ModelIndex

_LAYER = re.compile(r"\.(\d+)\.")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
_HEAD_HINTS = ("lm_head", "embed_out", "output.weight")
# an optional tensor and the tensor a tied model uses in its place (SEMANTICS §3.5)
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


_VOCAB_HINTS = ("embed_tokens", "wte", "word_embeddings", *_HEAD_HINTS)


def is_vocab_tensor(name: str) -> bool:
    """Tensors indexed by token id along axis 0: input embeddings and output heads."""
    return any(h in name for h in _VOCAB_HINTS)


@dataclass(frozen=True)
class Layout:
    """The tensors of one model as pre-weights, a layer template, and post-weights."""

    prefix: str  # e.g. "model.layers"
    num_layers: int
    template: tuple[str, ...]  # suffixes of one layer, in data order
    pre: tuple[str, ...]
    post: tuple[str, ...]

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.prefix}.{layer}.{suffix}"


def layout_of(index: ModelIndex) -> Layout:
    """Read the layer structure of one model from its tensor names and their order on disk."""
    order = {name: i for i, name in enumerate(_data_order(index))}
    layers: dict[str, dict[int, list[str]]] = {}
    flat = []
    for name in index.tensors:
        m = _LAYER.search(name)
        if m:
            prefix = name[: m.start()]
            layers.setdefault(prefix, {}).setdefault(int(m.group(1)), []).append(name[m.end():])
        else:
            flat.append(name)
    if len(layers) > 1:
        raise PlanError(f"model {index.label}: numbered tensors under several prefixes "
                        f"({', '.join(sorted(layers))}); only one stack of layers is supported yet")
    prefix, by_layer = next(iter(layers.items())) if layers else ("", {})
    n = max(by_layer) + 1 if by_layer else 0
    template: list[str] = []
    for i in range(n):
        for suffix in sorted(by_layer.get(i, []), key=lambda s: order[f"{prefix}.{i}.{s}"]):
            if suffix not in template:
                template.append(suffix)
    pre = sorted((f for f in flat if any(h in f for h in _PRE_HINTS)), key=order.__getitem__)
    post = sorted((f for f in flat if f not in pre),
                  key=lambda f: (any(h in f for h in _HEAD_HINTS), order[f]))
    return Layout(prefix, n, tuple(template), tuple(pre), tuple(post))


def _data_order(index: ModelIndex) -> list[str]:
    return sorted(index.tensors, key=lambda n: (index.tensors[n].shard, index.tensors[n].entry.begin))
