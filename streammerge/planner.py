"""Turn a config and the inputs' headers into a Plan: one task per output tensor, and the layout.

Imports config, params, index, hub, arch, methods, format, dtypes, errors. Reads no tensor
data. Every task carries its inputs, its method's resolved parameters (gradients evaluated
at its layer, filters matched), its output dtype and its byte range in an output shard; a
fingerprint (xxh3-128) covers each task, and the plan's covers all of them plus the layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from . import chat
from .arch import TIED, Layout, Stack, is_vocab_tensor, layout_of
from .config import (
    ConfigWarning,
    MergeConfig,
    ModelRef,
    Params,
    Slice,
    Source,
    check_parameters,
    param,
    parse_documents,
    unknown_method,
)
from .dtypes import compute_dtype, is_float, itemsize, promote
from .errors import ConfigError, InputError, PlanError
from .format import TensorEntry, build_header, row_shape
from .hub import resolve_model, resolve_models
from .index import ModelIndex, TensorRef
from .lora import AdaptedIndex
from .methods import ARITHMETIC, METHODS, Cost, MethodDef, TaskContext
from .options import DEFAULT_SEED, DEFAULT_SHARD_BYTES
from .params import ParamSpec, Scalar, evaluate_traced
from .vocab import Vocab, VocabRows, align, output_tokenizer, output_tokens, override, read_vocab

INPUT_KEY_SEP = "::"  # "<model ref>::<tensor name>": an input tensor, in journals and manifests


@dataclass(frozen=True)
class Model:
    """One input model: its reference, folder and lazy index."""

    ref: ModelRef
    folder: str
    index: ModelIndex = field(compare=False, repr=False)
    identity: str = ""  # xxh3-128 of its shards' names, sizes, mtimes and headers


@dataclass(frozen=True)
class TaskInput:
    model: int  # index into Plan.models
    tensor: str  # name in that model
    dtype: str  # safetensors code on disk


@dataclass(frozen=True)
class Task:
    """One output tensor: what to read, how to merge it, where its bytes go."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[TaskInput, ...]
    ctx: TaskContext
    load_dtype: str | None  # config `dtype`: inputs are cast to it when read
    compute: str  # "F32" or "F64"
    out_dtype: str
    copy_exact: bool  # non-float tensors: inputs must agree, the first is written
    t: float = 0.0  # gradient position: i/(L-1) in its slice, 0 for non-layer tensors
    vocab: VocabRows | None = field(default=None, compare=False)  # rows gathered per input (tokenizer source)
    provenance: dict[str, str] = field(default_factory=dict, compare=False)  # "t", "1.weight" -> where from
    shard: int = 0
    begin: int = 0  # absolute byte offset in the shard
    fingerprint: str = ""
    cost: Cost = field(default=Cost(0), compare=False)  # the method's, for this tensor's parameters

    @functools.cached_property
    def rows(self) -> int:
        return row_shape(self.shape)[0]

    @functools.cached_property
    def cols(self) -> int:
        return row_shape(self.shape)[1]

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * itemsize(self.out_dtype)


@dataclass(frozen=True)
class Shard:
    name: str
    header: bytes
    size: int  # final file size
    tasks: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    config: MergeConfig
    method: MethodDef
    models: tuple[Model, ...]
    tasks: tuple[Task, ...]
    shards: tuple[Shard, ...]
    donor: int  # model whose config.json and tokenizer are copied
    tokenizer_donor: int
    out_num_layers: int | None  # rewritten layer count (slices: syntax), else None
    seed: int
    fingerprint: str
    layout_fingerprint: str  # shard names and header bytes: what a resume must keep
    vocab_size: int | None = None  # the output vocabulary's size, when a tokenizer source rebuilt it
    tokenizer_json: str | None = None  # the output tokenizer.json, when rebuilt
    device: str = "cpu"  # where the kernels run: "cpu", "cuda" or "cuda:N"
    chat_template: str | None = None  # the template text the output's tokenizer carries, when set
    # why the run's budget leaves the compiled loops out (budget.choose_loops), "" where it does not
    loops_declined: str = field(default="", compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)


def make_plan(cfg: MergeConfig, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              seed: int = DEFAULT_SEED, aliases: dict[str, str | Plan] | None = None,
              truncate_vocab: bool = False, device: str = "cpu") -> Plan:
    """Plan the merge `cfg` describes, reading only headers.

    `aliases` maps names to folders: a pipeline's earlier stages, by name; a stage not yet run is
    given as its Plan, planned against what that stage will write (a check, never run). `truncate_vocab`
    (--unsafe-truncate-embeddings) merges vocabulary tensors of different sizes over the first
    rows common to all (SEMANTICS §3.6). `device` is where the kernels will run: a GPU's
    arithmetic may round differently, so tensors computed on one are fingerprinted as such.

    Raises:
        ConfigError: unknown method or bad parameter values, each with its config path.
        InputError: a model cannot be found or a shard is corrupt.
        PlanError: config and inputs do not fit (missing tensors, shapes, layers, contract).
    Example:
        >>> plan = make_plan(parse_config(open("merge.yml").read()))
        >>> len(plan.tasks), plan.shards[0].name
    """
    method = _method(cfg)
    problems, _ = check_parameters(cfg, method.specs)  # notes were given when the text was parsed
    if problems:
        raise ConfigError(problems)
    b = _Builder(cfg, method, seed, aliases or {})
    b.truncate_vocab = truncate_vocab
    b.build()
    if b.problems:
        raise PlanError(_dedupe(b.problems))
    _check_donor_config(b.models[b.donor()])
    identities = [m.identity for m in b.models]
    arithmetic = "cpu" if device == "cpu" else device.split(":")[0]
    tasks, shards = _layout(b.tasks, max_shard_bytes, method.name, identities, arithmetic)
    layout = xxhash.xxh3_128()
    for s in shards:
        layout.update(s.name.encode() + b"\0" + s.header)
    fp = xxhash.xxh3_128(layout.digest())
    for t in tasks:
        fp.update(t.fingerprint.encode())
    tok = json.dumps(b.tokenizer_json, ensure_ascii=False) if b.tokenizer_json is not None else None
    template = chat.resolve(cfg.chat_template, [b.models[b.model(r)].folder for r in config_refs(cfg)])
    if template is not None:
        fp.update(b"chat_template\0" + template.encode())
    return Plan(cfg, method, tuple(b.models), tuple(tasks), tuple(shards), b.donor(), b.tokenizer_donor(),
                b.out_num_layers(), seed, fp.hexdigest(), layout.hexdigest(),
                b.vocab_rows_out if b.out_tokens is not None else None, tok, device, template)


def parse(text: str, source: str = "config") -> list[MergeConfig]:
    """Parse a config (or a pipeline's configs), checking method names and parameter values in
    the same report as the structure, and warning once about ignored parameters."""
    return parse_documents(text, source, {name: m.specs for name, m in METHODS.items()})


def _method(cfg: MergeConfig) -> MethodDef:
    if cfg.merge_method in METHODS:
        return METHODS[cfg.merge_method]
    raise ConfigError([unknown_method(cfg.merge_method, list(METHODS))])


@dataclass(frozen=True)
class SliceSources:
    """One slice of the config, normalised: its sources (each with its layer range) and base model."""

    slice: Slice
    sources: tuple[Source, ...]
    base: ModelRef | None

    @property
    def depth(self) -> int:
        """Layers each source contributes."""
        r = self.sources[0].layer_range
        assert r is not None  # normalised
        return r[1] - r[0]

    def names(self, name: str) -> list[str]:
        """The same tensor name in every source."""
        return [name] * len(self.sources)


class PlannedIndex(ModelIndex):
    """The tensors a planned stage will write, as an index of headers only: a later stage can be
    planned against it (names, shapes, dtypes, layers) before the earlier one runs. Reads nothing."""

    def __init__(self, plan: Plan, folder: str, label: str) -> None:
        self.folder, self.label = folder, label
        self.headers, self._fds, self._local = {}, {}, threading.local()
        self.tensors, self.listed_missing, self._cached = {}, {}, {}
        for t in plan.tasks:
            shard = os.path.join(folder, plan.shards[t.shard].name)
            self.tensors[t.name] = TensorRef(shard, TensorEntry(t.name, t.out_dtype, t.shape, t.begin,
                                                                t.begin + t.nbytes))
        self._lock = threading.Lock()


def _check_donor_config(donor: Model) -> None:
    """The output's config.json comes from the donor: find a missing or broken one before any work,
    not after every tensor is merged."""
    if isinstance(donor.index, PlannedIndex):
        return  # written by an earlier stage, checked when that stage is planned
    path = os.path.join(donor.folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise InputError(f"model {donor.ref}: {path} is missing; the output's config.json is copied from this "
                         "model (the base model, else the first): restore it or re-download the model") from None
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"model {donor.ref}: {path} is not readable JSON ({type(e).__name__}: {str(e)[:200]}); the "
                         "output's config.json is copied from it: restore it or re-download the model") from None
    if not isinstance(cfg, dict):
        raise InputError(f"model {donor.ref}: {path} holds a JSON {type(cfg).__name__}, not an object; restore it "
                         "or re-download the model")


def config_refs(cfg: MergeConfig) -> list[ModelRef]:
    """Every model a config names, in the order it names them."""
    refs = [s.model for sl in cfg.slices for s in sl.sources]
    refs += [r for r in [cfg.base_model, *(sl.base_model for sl in cfg.slices)] if r is not None]
    if isinstance(cfg.tokenizer_source, ModelRef):
        refs.append(cfg.tokenizer_source)
    refs += [t.model for t in cfg.tokens if t.model is not None]
    return list(dict.fromkeys(refs))


def _union(lists: Iterable[tuple[str, ...]]) -> list[str]:
    out: dict[str, None] = {}
    for names in lists:
        out.update(dict.fromkeys(names))
    return list(out)


def _dedupe(items: list[str], limit: int = 20) -> list[str]:
    out = list(dict.fromkeys(items))
    return out if len(out) <= limit else out[:limit] + [f"... and {len(out) - limit} more"]


class _Builder:
    def __init__(self, cfg: MergeConfig, method: MethodDef, seed: int, aliases: dict[str, str | Plan]) -> None:
        self.cfg, self.method, self.seed, self.aliases = cfg, method, seed, aliases
        self.truncate_vocab = False
        self.out_tokens: list[str] | None = None  # the output vocabulary, when a tokenizer source is set
        self.vocab_rows_out = 0  # its rows, padded to pad_to_multiple_of
        self.vocabs: dict[int, Vocab] = {}
        self.tokenizer_json: dict[str, Any] | None = None
        self.models: list[Model] = []
        self._by_ref: dict[ModelRef, int] = {}
        self._layouts: dict[int, Layout] = {}
        self._folders: dict[ModelRef, str] = {}
        self.tasks: list[Task] = []
        self.problems: list[str] = []
        self.slices: list[SliceSources] = []

    def model(self, ref: ModelRef) -> int:
        if ref not in self._by_ref:
            alias = self.aliases.get(ref.path) if ref.revision is None else None
            if isinstance(alias, Plan):  # an earlier stage not yet run: what it will write
                index: ModelIndex = PlannedIndex(alias, f"{ref.path} (an earlier stage, not yet run)", str(ref))
                folder, ident = alias.models[alias.tokenizer_donor].folder, alias.fingerprint
            else:
                base = ref.base
                folder = alias or self._folders.get(base) or resolve_model(base)
                index = ModelIndex(folder, str(base), give_back=True)
                if ref.adapter is not None:
                    lora = self._folders.get(ref.adapter) or resolve_model(ref.adapter)
                    index = AdaptedIndex(index, lora, str(ref))
                ident = index.identity_hash()
            self._by_ref[ref] = len(self.models)
            self.models.append(Model(ref, folder, index, ident))
            self._layouts[self._by_ref[ref]] = layout_of(index)
        return self._by_ref[ref]

    def layout(self, ref: ModelRef) -> Layout:
        return self._layouts[self.model(ref)]

    def build(self) -> None:
        refs = config_refs(self.cfg)
        self._folders = resolve_models([r.base for r in refs if r.revision is not None or r.path not in self.aliases]
                                       + [r.adapter for r in refs if r.adapter is not None])
        for sl in self.cfg.slices:
            self.slices.append(self._normalize(sl))
        if self.problems:
            return
        if self.cfg.tokenizer_source is not None:
            self._prepare_vocab()
        first, last = self.slices[0], self.slices[-1]
        # post-weights pair the first slice's source count with the last slice's models (§3.4)
        post = SliceSources(last.slice, last.sources[: len(first.sources)], last.base)
        lay0 = self.layout(first.sources[0].model)
        for name in _union(self.layout(s.model).pre for s in first.sources):
            self._task(name, first, first.names(name), 0.0)
        for stack in lay0.others:  # a vision tower: whole, layer by layer, with the first slice's sources
            self._other_stack(stack, first)
        out_layer = 0
        for part in self.slices:
            template = self.layout(part.sources[0].model).template
            for i in range(part.depth):
                t = i / (part.depth - 1) if part.depth > 1 else 1.0
                for suffix in template:
                    names = [self.layout(s.model).layer_name(s.layer_range[0] + i, suffix)  # type: ignore[index]
                             for s in part.sources]
                    self._task(lay0.layer_name(out_layer, suffix), part, names, t)
                out_layer += 1
        for name in _union(self.layout(s.model).post for s in post.sources):
            self._task(name, post, post.names(name), 0.0)

    def _other_stack(self, stack: Stack, sl: SliceSources) -> None:
        """Tasks for a stack other than the language model's, over its own depth (gradients too)."""
        sources = sl.sources
        for s in sources:
            theirs = self.layout(s.model).stack(stack.prefix)
            if theirs is None or theirs.num_layers != stack.num_layers:
                have = f"{theirs.num_layers} layers" if theirs else "no such stack"
                self.problems.append(f"{s.path}: model {s.model} has {have} under {stack.prefix!r}, "
                                     f"where {sources[0].model} has {stack.num_layers}")
                return
        n = stack.num_layers
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            for suffix in stack.template:
                name = stack.layer_name(i, suffix)
                self._task(name, sl, sl.names(name), t)

    def _prepare_vocab(self) -> None:
        """Every model's tokens, and the output vocabulary the tokenizer source builds (§3.6)."""
        refs = list(dict.fromkeys(s.model for sl in self.slices for s in sl.sources))
        idx = [self.model(r) for r in refs]
        for i in idx:
            index = self.models[i].index
            emb = next((n for n in index.tensors if is_vocab_tensor(n)), None)
            if emb is None:
                self.problems.append(f"model {self.models[i].ref}: no embedding tensor to align with a tokenizer")
                return
            self.vocabs[i] = read_vocab(self.models[i].folder, index.tensors[emb].entry.shape[0])
        base = self.donor()
        src = self.cfg.tokenizer_source
        source: str | int = src if isinstance(src, str) else idx.index(self.model(src))  # type: ignore[arg-type]
        ordered = [self.vocabs[i] for i in idx]
        self.out_tokens = output_tokens(ordered, source, idx.index(base) if base in idx else 0)
        added = [t.token for t in self.cfg.tokens if t.token not in set(self.out_tokens)]
        self.out_tokens += list(dict.fromkeys(added))  # configured tokens that are missing are added
        template = self.vocabs[base if src in ("base", "union") else self.model(src)].tokenizer  # type: ignore[arg-type]
        changed = src == "union" or added
        self.tokenizer_json = output_tokenizer(template, self.out_tokens) if changed else template
        multiple = self.cfg.pad_to_multiple_of or 1
        self.vocab_rows_out = -(-len(self.out_tokens) // multiple) * multiple

    def _configured(self, inputs: list[TaskInput]) -> dict[int, tuple[tuple[tuple[int, int], ...], bool]]:
        """tokenizer.tokens for one vocabulary task: output row -> ((input, row), ...) and force."""
        assert self.out_tokens is not None
        position: dict[int, int] = {}
        for k, inp in enumerate(inputs):
            position.setdefault(inp.model, k)  # a model's first input position
        out: dict[int, tuple[tuple[tuple[int, int], ...], bool]] = {}
        for spec in self.cfg.tokens:
            j = self.out_tokens.index(spec.token)
            if spec.kind == "default":
                if spec.force:
                    self.problems.append(f"tokenizer.tokens.{spec.token}: force needs a source")
                continue
            if spec.kind == "zero":
                out[j] = ((), spec.force)
                continue
            assert spec.model is not None
            pos = position.get(self.model(spec.model))
            vocab = self.vocabs.get(self.model(spec.model))
            want = spec.token if spec.kind == "model" else spec.source_token
            row = spec.source_id if spec.source_id is not None else -1
            if spec.source_id is None and vocab is not None and want is not None:
                row = vocab.tokens.get(want, -1)
            if pos is None or row < 0:
                why = "is not an input of the merge" if pos is None else f"has no token {want!r}"
                self.problems.append(f"tokenizer.tokens.{spec.token}.source: model {spec.model} {why}")
                continue
            out[j] = (((pos, row),), spec.force)
        return out

    def _normalize(self, sl: Slice) -> SliceSources:
        base = sl.base_model or self.cfg.base_model
        sources = list(sl.sources)
        if not self.cfg.uses_slices:
            if base is not None and base not in [s.model for s in sources]:
                sources.append(Source(base, None, (), "base_model"))
            sources = [Source(s.model, (0, self.layout(s.model).num_layers), s.parameters, s.path)
                       for s in sources]
        seen = set()
        for s in sources:
            if s.model in seen:
                self.problems.append(f"{s.path}: model {s.model} is listed twice in one slice (duplicate "
                                     "merge inputs); list each model once")
            seen.add(s.model)
            avail = self.layout(s.model).num_layers
            assert s.layer_range is not None
            if s.layer_range[1] > avail:
                self.problems.append(f"{s.path}.layer_range: [{s.layer_range[0]}, {s.layer_range[1]}] goes past "
                                     f"the {avail} layers of {s.model}")
        spans = {s.layer_range[1] - s.layer_range[0] for s in sources}  # type: ignore[index]
        if len(spans) > 1:
            self.problems.append(f"{sl.path}: all sources of a slice must span the same number of layers "
                                 f"(got {sorted(spans)})")
        if base is not None and self.method.base != "ignored" and base not in [s.model for s in sources]:
            self.problems.append(f"{sl.path}: base model {base} is not one of the slice's sources; add it "
                                 "as a source")
        return SliceSources(sl, tuple(sources), base)

    def _task(self, out: str, sl: SliceSources, names: list[str], t: float) -> None:
        """The task for output tensor `out`, made from tensor names[k] of each source; problems are
        collected, and a tensor with any is left out."""
        found = self._inputs(sl.sources, names)
        if found is None:
            return
        inputs, srcs = found
        if out in TIED and not any(i.tensor == out for i in inputs):
            return  # no input has its own head: tied output, nothing to write
        shaped = self._shape(out, inputs, srcs, sl.base)
        if shaped is None:
            return
        shape, vocab_rows = shaped
        base_idx = next((k for k, s in enumerate(srcs) if s.model == sl.base), None)
        if not self._contract(out, srcs, base_idx):
            return
        shared, per_input, provenance = self._parameters(out, sl, srcs, inputs, base_idx, t)
        ctx = TaskContext(out, shape, base_idx, tuple(per_input), shared, self.seed,
                          tuple(self._position(sl.sources, s) for s in srcs))
        problems = self.method.check(ctx)
        if problems:
            self.problems += problems
            return
        codes = [self.cfg.dtype or i.dtype for i in inputs]
        promoted = promote(codes)
        self.tasks.append(Task(out, ctx.shape, tuple(inputs), ctx, self.cfg.dtype,
                               "F64" if compute_dtype(promoted).itemsize == 8 else "F32",
                               self.cfg.out_dtype or promoted, not all(is_float(c) for c in codes), t=t,
                               provenance=provenance, vocab=vocab_rows, cost=self.method.cost(ctx)))

    def _inputs(self, sources: tuple[Source, ...], names: list[str]) -> tuple[list[TaskInput], list[Source]] | None:
        """Each source's tensor (a tied model's embeddings standing in for its head; an optional
        head no source has skipped), and the sources that have one; None if a required one is missing."""
        inputs, srcs = [], []
        for s, name in zip(sources, names):
            idx = self.models[self.model(s.model)].index
            if name not in idx.tensors and name in TIED and TIED[name] in idx.tensors:
                name = TIED[name]  # a tied model uses its embeddings as its head
            elif name not in idx.tensors:
                if name in TIED:
                    continue  # optional: written only if some input has it
                lost = idx.listed_missing.get(name)
                where = (f"; the shard index lists it in {lost}, but that shard lacks it: re-download the model"
                         if lost else "")
                self.problems.append(f"tensor {name!r} required but not present in model {s.model} "
                                     f"({idx.folder}){where}")
                return None
            inputs.append(TaskInput(self.model(s.model), name, idx.tensors[name].entry.dtype))
            srcs.append(s)
        return inputs, srcs

    def _shape(self, out: str, inputs: list[TaskInput], srcs: list[Source],
               base: ModelRef | None) -> tuple[tuple[int, ...], VocabRows | None] | None:
        """The output shape, and the rows each input gives a vocabulary tensor aligned to the output
        tokenizer (None: rows as they are); None if the inputs' shapes cannot be merged."""
        shape_of = [self.models[i.model].index.tensors[i.tensor].entry.shape for i in inputs]
        shapes = set(shape_of)
        same_width = len({s[1:] for s in shapes}) == 1
        vocab_rows = None
        if self.out_tokens is not None and is_vocab_tensor(out) and same_width:
            vocab_rows = self._aligned_rows(out, inputs, srcs, base)
            shapes = {(self.vocab_rows_out, *shape_of[0][1:])}
            if vocab_rows.is_identity() and all(s[0] == self.vocab_rows_out for s in shape_of):
                vocab_rows = None
        if len(shapes) == 1:
            return shapes.pop(), vocab_rows
        detail = ", ".join(f"{self.models[i.model].ref}: {list(s)}" for i, s in zip(inputs, shape_of))
        rows = min(s[0] for s in shape_of)
        if not (is_vocab_tensor(out) and same_width and len(shape_of[0]) >= 1):
            self.problems.append(f"tensor {out!r}: input shapes differ ({detail}); the models are not the "
                                 "same architecture")
            return None
        sizes = self._vocab_sizes(inputs, shape_of)
        if not self.truncate_vocab:
            self.problems.append(
                f"tensor {out!r}: vocabulary sizes differ ({sizes}), and the config has no tokenizer "
                "to align them (mergekit 0.1.5 refuses this too). Either add `tokenizer: {source: base}` "
                "to the config (each model's rows are matched to the base's tokens by token), or pass "
                f"--unsafe-truncate-embeddings (keep the first {rows} rows of each, as mergekit before "
                "0.1.5 did silently)")
            return None
        warnings.warn(f"tensor {out!r}: vocabulary sizes differ ({sizes}); keeping the first {rows} rows of "
                      "each (--unsafe-truncate-embeddings); the config's vocab_size is unchanged",
                      ConfigWarning, stacklevel=3)
        return (rows, *shape_of[0][1:]), None

    def _aligned_rows(self, out: str, inputs: list[TaskInput], srcs: list[Source], base: ModelRef | None) -> VocabRows:
        """Each input's row for each output token (configured overrides applied, orphans warned of)."""
        assert self.out_tokens is not None
        base_pos = next((k for k, s in enumerate(srcs) if s.model == base), 0)
        vocab_rows, orphans = align([self.vocabs[i.model] for i in inputs], self.out_tokens, base_pos)
        configured = self._configured(inputs)
        orphans = [t for t in orphans if self.out_tokens.index(t) not in configured]
        if orphans:
            warnings.warn(f"tensor {out!r}: {len(orphans)} token(s) no input has (e.g. {orphans[0]!r}) get "
                          "zero rows", ConfigWarning, stacklevel=4)
        return override(vocab_rows, configured, self.vocab_rows_out - len(self.out_tokens))

    def _parameters(self, out: str, sl: SliceSources, srcs: list[Source], inputs: list[TaskInput],
                    base_idx: int | None, t: float) -> tuple[dict[str, Scalar], list[dict[str, Scalar]],
                                                             dict[str, str]]:
        """The method's shared and per-input parameters at this tensor, and where each came from."""
        provenance: dict[str, str] = {}
        common = [(f"{sl.slice.path}.parameters", sl.slice.parameters), ("parameters", self.cfg.parameters)]
        shared = {}
        for p in self.method.params:
            if p.scope == "shared":
                shared[p.name], provenance[p.name] = self._resolve(p, common, out, t, out)
        per_input = []
        for k, (s, inp) in enumerate(zip(srcs, inputs)):
            scopes = [(f"{x.path}.parameters", x.parameters) for x in sl.sources if x.model == s.model] + common
            values = {}
            for p in self.method.params:
                if p.scope == "input" or (p.scope == "nonbase" and k != base_idx):
                    values[p.name], provenance[f"{k}.{p.name}"] = self._resolve(
                        p, scopes, inp.tensor, t, f"{s.model}.{inp.tensor}")
            per_input.append(values)
        return shared, per_input, provenance

    def _vocab_sizes(self, inputs: list[TaskInput], shape_of: list[tuple[int, ...]]) -> str:
        """'32000 rows: a, b; 32002 rows: c' — the inputs grouped by vocabulary size."""
        groups: dict[int, list[str]] = {}
        for i, s in zip(inputs, shape_of):
            groups.setdefault(s[0], []).append(str(self.models[i.model].ref))
        return "; ".join(f"{n} rows: {', '.join(m)}" for n, m in sorted(groups.items()))

    @staticmethod
    def _position(sources: tuple[Source, ...], s: Source) -> int:
        return [x.model for x in sources].index(s.model)

    def _contract(self, out: str, srcs: list[Source], base_idx: int | None) -> bool:
        m, n = self.method, len(srcs)
        why = None
        if m.base == "required" and base_idx is None:
            why = f"{m.name} needs a base_model among its inputs"
        elif n < m.min_inputs or (m.max_inputs is not None and n > m.max_inputs):
            want = (f"exactly {m.min_inputs}" if m.max_inputs == m.min_inputs
                    else f"at least {m.min_inputs}" if m.max_inputs is None else f"{m.min_inputs}..{m.max_inputs}")
            why = f"{m.name} takes {want} inputs, got {n}"
        else:
            others = n - (base_idx is not None)
            if others < m.min_others or (m.max_others is not None and others > m.max_others):
                want = f"exactly {m.min_others}" if m.max_others == m.min_others else f"at least {m.min_others}"
                why = f"{m.name} takes {want} non-base inputs, got {others}"
        if why:
            self.problems.append(f"tensor {out!r}: {why} ({', '.join(str(s.model) for s in srcs)})")
            return False
        return True

    def _resolve(self, spec: ParamSpec, scopes: list[tuple[str, Params]], name: str, t: float,
                 where: str) -> tuple[Scalar, str]:
        """The value of one parameter, highest-precedence scope first, and where it came from."""
        for path, params in scopes:
            setting = param(params, spec.name)
            if setting is not None:
                value, how = evaluate_traced(setting, name, t, spec.kind)
                if value is not None:
                    return value, f"{path}.{spec.name}" + (f" {how}" if how else "")
        if spec.required:
            self.problems.append(f"missing required parameter {spec.name!r} for {where}; set it under the "
                                 "model's parameters or the top-level parameters")
            return 0.0, "missing"
        assert spec.default is not None or spec.nullable
        return spec.default, f"default of {self.method.name}"  # type: ignore[return-value]

    def donor(self) -> int:
        ref = self.cfg.base_model or self.slices[0].sources[0].model
        return self.model(ref)

    def tokenizer_donor(self) -> int:
        src = self.cfg.tokenizer_source
        if src is None or src in ("base", "union"):  # a union tokenizer is the base's, extended
            return self.donor()
        assert isinstance(src, ModelRef)
        return self.model(src)

    def out_num_layers(self) -> int | None:
        if not self.cfg.uses_slices:
            return None
        return sum(sl.depth for sl in self.slices)


def _layout(tasks: list[Task], max_shard_bytes: int, method: str, identities: list[str],
            arithmetic: str = "cpu") -> tuple[list[Task], list[Shard]]:
    """Assign tasks to shards in order (mergekit's rule) and fix every byte offset."""
    groups: list[list[int]] = []
    size = 0
    for i, t in enumerate(tasks):
        if not groups or (max_shard_bytes > 0 and size > 0 and size + t.nbytes > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.nbytes
    n = len(groups)
    out = list(tasks)
    shards = []
    for s, idxs in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        header, ranges = build_header([(tasks[i].name, tasks[i].out_dtype, tasks[i].shape) for i in idxs],
                                      {"format": "pt"})
        for i, (begin, _) in zip(idxs, ranges):
            t = tasks[i]
            fp = _fingerprint(t, name, begin, method, [identities[i.model] for i in t.inputs], arithmetic)
            out[i] = dataclasses.replace(t, shard=s, begin=begin, fingerprint=fp)
        shards.append(Shard(name, header, ranges[-1][1] if ranges else len(header), tuple(idxs)))
    return out, shards


def _fingerprint(t: Task, shard: str, begin: int, method: str, identities: list[str],
                 arithmetic: str = "cpu") -> str:
    canon: dict[str, object] = {
        "method": method, "arithmetic": ARITHMETIC, "input_identities": identities,
        "name": t.name, "shape": list(t.shape), "out_dtype": t.out_dtype, "load_dtype": t.load_dtype,
        "compute": t.compute, "copy_exact": t.copy_exact, "shard": shard, "begin": begin,
        "inputs": [[i.model, i.tensor, i.dtype] for i in t.inputs],
        "base": t.ctx.base, "shared": t.ctx.shared, "per_input": list(t.ctx.input_params),
        "seed": t.ctx.seed, "positions": list(t.ctx.input_positions),
        "vocab": None if t.vocab is None else xxhash.xxh3_128_hexdigest(repr(t.vocab).encode()),
    }
    if arithmetic != "cpu" and not t.copy_exact:
        canon["device"] = arithmetic  # a GPU's kernels may round differently; CPU fingerprints stay as they were
    return xxhash.xxh3_128_hexdigest(json.dumps(canon, sort_keys=True).encode())


def content_identity(identity: object) -> object:
    """An input's identity() without where it lies and when it was written (folder paths, mtimes):
    what two machines holding the same files agree on, though each downloaded its own copy."""
    if isinstance(identity, dict):
        return {k: content_identity(v) for k, v in identity.items() if k not in ("folder", "mtime_ns")}
    return identity


def content_identities(plan: Plan) -> list[object]:
    """Each model's content_identity, in plan.models order (its files' headers read once)."""
    return [content_identity(m.index.identity()) for m in plan.models]


def content_fingerprint(plan: Plan, contents: list[object]) -> str:
    """The plan's fingerprint with each input identified by its content identity (`contents`, from
    content_identities): equal on every machine that would merge the same tensors from the same
    files to the same layout, wherever those files lie. A Ray worker plans the merge itself and
    must arrive at this value."""
    digests = [xxhash.xxh3_128_hexdigest(json.dumps(c, sort_keys=True).encode()) for c in contents]
    fp = xxhash.xxh3_128(plan.layout_fingerprint.encode())
    for t in plan.tasks:
        fp.update(_fingerprint(t, plan.shards[t.shard].name, t.begin, plan.method.name,
                               [digests[i.model] for i in t.inputs], plan.device.split(":")[0]).encode())
    for extra in (plan.tokenizer_json, plan.chat_template):
        fp.update(b"\0" + (extra or "").encode())
    return fp.hexdigest()
