"""Layer structure of a checkpoint, read from its tensor names.

Imports errors and index. The first `.N.` in a name marks a layer (mergekit's rule for
inferred architectures); each prefix before it is a stack of layers (a language model; in a
vision-language model also a vision tower), the one beside the token embeddings being the main
stack that slices address. Names without a layer number are pre-weights (embeddings) or
post-weights (norms, projectors, heads). Output order is the natural one (SEMANTICS deviation 5):
pre-weights, the other stacks, the main stack's layers 0, 1, 2, ..., post-weights with heads last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import PlanError
from .index import ModelIndex

_LAYER = re.compile(r"\.(\d+)\.")
MAX_LAYERS = 100_000  # far past any model; a larger number is a damaged name, not a model to plan
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")
_HEAD_HINTS = ("lm_head", "embed_out", "output.weight")
# an optional tensor and the tensor a tied model uses in its place (SEMANTICS §3.5)
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


_VOCAB_HINTS = ("embed_tokens", "wte", "word_embeddings", *_HEAD_HINTS)


def is_vocab_tensor(name: str) -> bool:
    """Tensors indexed by token id along axis 0: input embeddings and output heads."""
    return any(h in name for h in _VOCAB_HINTS)


@dataclass(frozen=True)
class Stack:
    """One numbered stack of layers: `prefix.N.suffix` for N in 0..num_layers-1."""

    prefix: str  # e.g. "model.layers", "vision_tower.vision_model.encoder.layers"
    num_layers: int
    template: tuple[str, ...]  # suffixes of one layer, in data order

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.prefix}.{layer}.{suffix}"


@dataclass(frozen=True)
class Layout:
    """The tensors of one model as pre-weights, a main layer stack, other stacks, and post-weights.

    The main stack is the language model's (the one beside the token embeddings): `slices` and
    `layer_range` address it, and the output's layer count is its. Other stacks (a vision tower)
    keep their own numbering and depth."""

    prefix: str  # the main stack's, e.g. "model.layers"
    num_layers: int
    template: tuple[str, ...]  # suffixes of one layer, in data order
    pre: tuple[str, ...]
    post: tuple[str, ...]
    others: tuple[Stack, ...] = ()

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.prefix}.{layer}.{suffix}"

    def stack(self, prefix: str) -> Stack | None:
        return next((s for s in self.others if s.prefix == prefix), None)


def layout_of(index: ModelIndex) -> Layout:
    """Read the layer structure of one model from its tensor names and their order on disk."""
    order = {name: i for i, name in enumerate(_data_order(index))}
    layers: dict[str, dict[int, list[str]]] = {}
    flat = []
    for name in index.tensors:
        m = _LAYER.search(name)
        if m:
            if len(m.group(1)) > len(str(MAX_LAYERS)):
                raise PlanError(f"model {index.label}: tensor {name[:80]!r}... has a layer number past {MAX_LAYERS}; "
                                "is this a model's tensor name?")
            prefix = name[: m.start()]
            layers.setdefault(prefix, {}).setdefault(int(m.group(1)), []).append(name[m.end():])
        else:
            flat.append(name)
    stacks = [_stack(prefix, by_layer, order) for prefix, by_layer in layers.items()]
    stacks.sort(key=lambda st: order[st.layer_name(0, st.template[0])] if st.template else 0)
    main = _main_stack(stacks, flat)
    pre = sorted((f for f in flat if any(h in f for h in _PRE_HINTS)), key=order.__getitem__)
    post = sorted((f for f in flat if f not in pre),
                  key=lambda f: (any(h in f for h in _HEAD_HINTS), order[f]))
    others = tuple(st for st in stacks if st is not main)
    if main is None:
        return Layout("", 0, (), tuple(pre), tuple(post), others)
    return Layout(main.prefix, main.num_layers, main.template, tuple(pre), tuple(post), others)


def _stack(prefix: str, by_layer: dict[int, list[str]], order: dict[str, int]) -> Stack:
    n = max(by_layer) + 1
    if n > MAX_LAYERS:
        raise PlanError(f"tensor {prefix}.{max(by_layer)}...: a layer number past {MAX_LAYERS}; "
                        "is this a model's tensor name?")
    template: list[str] = []
    for i in range(n):
        for suffix in sorted(by_layer.get(i, []), key=lambda s: order[f"{prefix}.{i}.{s}"]):
            if suffix not in template:
                template.append(suffix)
    return Stack(prefix, n, tuple(template))


def _main_stack(stacks: list[Stack], flat: list[str]) -> Stack | None:
    """The language model's stack: the one whose parent holds the token embeddings, else the deepest."""
    if len(stacks) <= 1:
        return stacks[0] if stacks else None
    parents = {name.rsplit(".", 2)[0] for name in flat if is_vocab_tensor(name) and "embed" in name}
    beside = [st for st in stacks if st.prefix.rsplit(".", 1)[0] in parents]
    return beside[0] if len(beside) == 1 else max(stacks, key=lambda st: st.num_layers)


def _data_order(index: ModelIndex) -> list[str]:
    return sorted(index.tensors, key=lambda n: (index.tensors[n].shard, index.tensors[n].entry.begin))
