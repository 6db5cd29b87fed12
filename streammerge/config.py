"""Parse a mergekit YAML config into frozen dataclasses, reporting every problem at once.

Imports errors, dtypes and params (and PyYAML). Structure only: whether a parameter suits
the chosen method is checked by `check_parameters`, given the method's specs by the plan.
Each problem names its path in the file, e.g. `models[3].parameters.density`.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import chat
from .dtypes import CONFIG_DTYPES, config_dtype_code
from .errors import ConfigError
from .params import Conditional, CondList, Gradient, ParamSpec, ParamTypeError, Setting, evaluate

TOP_KEYS = (
    "merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype",
    "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name",
)


class ConfigWarning(UserWarning):
    """Something in a config is ignored; the message says what and why."""


@dataclass(frozen=True)
class ModelRef:
    """A model: a local folder or a Hugging Face id, with an optional revision and LoRA adapter."""

    path: str
    revision: str | None = None
    lora: str | None = None  # a PEFT LoRA adapter applied to the model (`BASE+ADAPTER`)
    lora_revision: str | None = None

    def __str__(self) -> str:
        text = self.path + (f"@{self.revision}" if self.revision else "")
        if self.lora:
            text += "+" + self.lora + (f"@{self.lora_revision}" if self.lora_revision else "")
        return text

    @property
    def base(self) -> ModelRef:
        """The model without its adapter."""
        return ModelRef(self.path, self.revision)

    @property
    def adapter(self) -> ModelRef | None:
        """The adapter, as a reference of its own (a folder or a Hub id)."""
        return ModelRef(self.lora, self.lora_revision) if self.lora else None


Params = tuple[tuple[str, Setting], ...]  # frozen (name, setting) pairs in file order


def param(params: Params, name: str) -> Setting | None:
    """The setting named `name` in `params`, or None."""
    for k, v in params:
        if k == name:
            return v
    return None


@dataclass(frozen=True)
class Source:
    """One input of a slice: a model, its layer range [start, end), its parameters."""

    model: ModelRef
    layer_range: tuple[int, int] | None  # None: all layers (the `models:` form)
    parameters: Params = ()
    path: str = ""  # where it was written, e.g. "slices[0].sources[1]"


@dataclass(frozen=True)
class Slice:
    """An output slice: its sources, optional base and parameters."""

    sources: tuple[Source, ...]
    base_model: ModelRef | None = None
    parameters: Params = ()
    path: str = ""


@dataclass(frozen=True)
class TokenSpec:
    """`tokenizer.tokens.<token>`: where the token's embedding comes from, and whether it is forced."""

    token: str
    kind: str  # "default" (only ensure the token exists), "model", "model_token" or "zero"
    model: ModelRef | None = None
    source_token: str | None = None
    source_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class MergeConfig:
    """A whole config. Exactly one of `models` (as one slice) or `slices` is given."""

    merge_method: str
    slices: tuple[Slice, ...]
    uses_slices: bool  # written with `slices:` (the output layer count is rewritten)
    base_model: ModelRef | None
    parameters: Params
    dtype: str | None  # safetensors code applied to inputs at load
    out_dtype: str | None  # code applied to outputs before writing
    tokenizer_source: str | ModelRef | None  # "base", "union" or a model
    name: str | None = None
    text: str = field(default="", compare=False)  # the YAML verbatim, for the output folder
    tokens: tuple[TokenSpec, ...] = ()  # tokenizer.tokens overrides
    pad_to_multiple_of: int | None = None
    chat_template: str | None = None  # "auto", a built-in name or a Jinja template (chat.py)


# a pipeline stage's name: a model id like org/name, which becomes its folder under the intermediates
_STAGE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")
MAX_YAML_NODES = 200_000  # a config has hundreds; an alias bomb ("billion laughs") expands to billions
MAX_FLOW_DEPTH = 100  # [ and { nested: a config needs a handful


class _TooDeep(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last),
    and brackets nested more than MAX_FLOW_DEPTH deep as soon as the scanner meets them: its
    work per token grows with the depth, so 5,000 levels took seconds before the composer's
    recursion limit stopped them."""

    def fetch_flow_collection_start(self, TokenClass: type) -> None:  # noqa: N803 - PyYAML's name
        if self.flow_level >= MAX_FLOW_DEPTH:
            raise _TooDeep()
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[misc]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "config") -> Any:
    """The YAML document `text`, refusing duplicate keys, alias bombs and absurd nesting.

    Raises:
        ConfigError: saying what is wrong and where.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError([f"the YAML expands to more than {MAX_YAML_NODES} values through its aliases "
                               "(&anchor / *alias); write the config out plainly"], source)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _TooDeep:
        raise ConfigError([f"the YAML nests brackets more than {MAX_FLOW_DEPTH} deep; a merge config needs "
                           "a handful"], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source) from e
    except RecursionError:
        raise ConfigError(["the YAML is nested too deeply to be a merge config"], source) from None


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in the document once every alias is expanded (shared nodes counted each time)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once; the loader refuses it anyway
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def parse_config(text: str, source: str = "config",
                 methods: Mapping[str, Mapping[str, ParamSpec]] | None = None) -> MergeConfig:
    """Parse the YAML `text` of one mergekit config.

    Args:
        text: the YAML document.
        source: a name for messages (the file path).
        methods: the parameter specs of every known method; given, the method name and every
            parameter value are checked too, in the same report (planner.parse passes them).
    Returns:
        The config, frozen.
    Raises:
        ConfigError: listing every problem found, each with its path in the file.
    Example:
        >>> cfg = parse_config("merge_method: linear\\nmodels: [{model: a, parameters: {weight: 1}}]")
        >>> cfg.slices[0].sources[0].model.path
        'a'
    """
    doc = load_yaml(text, source)
    p = _Parser(source)
    cfg = p.document(doc, text)
    if cfg is not None and methods is not None and cfg.merge_method:
        if cfg.merge_method not in methods:
            p.problems.insert(0, unknown_method(cfg.merge_method, list(methods)))
        else:
            problems, notes = check_parameters(cfg, methods[cfg.merge_method])
            p.problems += problems
            for note in notes:
                warnings.warn(f"{source}: {note}", ConfigWarning, stacklevel=2)
    if p.problems:
        raise ConfigError(p.problems, source)
    assert cfg is not None
    return cfg


class _Parser:
    def __init__(self, source: str) -> None:
        self.origin = source
        self.problems: list[str] = []

    def fail(self, path: str, what: str) -> None:
        self.problems.append(f"{path}: {what}" if path else what)

    def warn(self, path: str, what: str) -> None:
        warnings.warn(f"{self.origin}: {path}: {what}", ConfigWarning, stacklevel=4)

    def document(self, doc: Any, text: str) -> MergeConfig | None:
        if not isinstance(doc, dict):
            self.fail("", "expected a mapping with merge_method and models or slices at the top level")
            return None
        self.unknown_keys(doc, TOP_KEYS, "")
        method = doc.get("merge_method")
        if not isinstance(method, str) or not method:
            self.fail("merge_method", "required: a method name such as linear, ties, dare_ties or slerp")
            method = ""
        if "modules" in doc and doc["modules"]:
            self.fail("modules", "the per-module form is not supported yet; use models: or slices:")
        has_models, has_slices = bool(doc.get("models")), bool(doc.get("slices"))
        if has_models == has_slices:
            self.fail("", "exactly one of 'models' or 'slices' must be present")
        base = self.model_ref(doc["base_model"], "base_model") if doc.get("base_model") else None
        slices: tuple[Slice, ...] = ()
        if has_models and not has_slices:
            slices = (self.models(doc["models"]),)
        elif has_slices and not has_models:
            slices = self.slices(doc["slices"])
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            self.fail("name", f"expected a string, got {name!r}")
            name = None
        elif name is not None and (not _STAGE_NAME.fullmatch(name) or "." in name.split("/")):
            self.fail("name", f"{name!r}: a stage name is a folder name under the intermediate folder, so it may "
                              "use letters, digits, '.', '_', '-' and one '/' (org/model), and no '..'")
            name = None
        return MergeConfig(
            merge_method=method,
            slices=slices,
            uses_slices=has_slices,
            base_model=base,
            parameters=self.params(doc.get("parameters"), "parameters"),
            dtype=self.dtype(doc.get("dtype"), "dtype"),
            out_dtype=self.dtype(doc.get("out_dtype"), "out_dtype"),
            tokenizer_source=self.tokenizer(doc),
            name=name,
            text=text,
            tokens=self.token_specs(doc),
            pad_to_multiple_of=self.pad(doc),
            chat_template=doc["chat_template"] if isinstance(doc.get("chat_template"), str) else None,
        )

    def unknown_keys(self, obj: dict[str, Any], known: tuple[str, ...], path: str) -> None:
        for key in obj:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                self.warn(f"{path}{'.' if path else ''}{key}", f"unknown key, ignored{hint}")

    def model_ref(self, value: Any, path: str) -> ModelRef | None:
        """`path[@rev]`, `path[@rev]+adapter[@rev]`, or mergekit's dict form {model: {path, revision},
        lora: {path, revision}}."""
        if isinstance(value, dict):
            inner = value.get("model", value)
            lora = value.get("lora")
            if isinstance(inner, dict) and isinstance(inner.get("path"), str) and (
                    lora is None or isinstance(lora, dict) and isinstance(lora.get("path"), str)):
                rev = inner.get("revision")
                lrev = lora.get("revision") if lora else None
                return ModelRef(inner["path"], str(rev) if rev is not None else None,
                                lora["path"] if lora else None, str(lrev) if lrev is not None else None)
            self.fail(path, f"expected a model reference like org/name or a folder, got {value!r}")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a model reference like org/name or a folder, got {value!r}")
            return None
        base_text, plus, lora_text = value.partition("+")
        if plus and not lora_text.strip():
            self.fail(path, f"{value!r}: nothing after '+'; write BASE+ADAPTER")
            return None
        base = self.path_at(base_text, value, path)
        lora = self.path_at(lora_text, value, path) if plus else (None, None)
        if base is None or base[0] is None or lora is None:
            return None
        return ModelRef(base[0], base[1], lora[0], lora[1])

    def path_at(self, part: str, value: str, path: str) -> tuple[str | None, str | None] | None:
        pieces = part.split("@")
        if len(pieces) > 2:
            self.fail(path, f"{value!r}: more than one '@' in a model reference")
            return None
        return pieces[0], pieces[1] if len(pieces) == 2 and pieces[1] else None

    def models(self, items: Any) -> Slice:
        if not isinstance(items, list):
            self.fail("models", "expected a list of {model: ..., parameters: ...}")
            return Slice(())
        sources = []
        for i, item in enumerate(items):
            path = f"models[{i}]"
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict) or "model" not in item:
                self.fail(path, "expected {model: ..., parameters: ...}")
                continue
            self.unknown_keys(item, ("model", "parameters"), path)
            ref = self.model_ref(item["model"], f"{path}.model")
            if ref is not None:
                params = self.params(item.get("parameters"), f"{path}.parameters")
                sources.append(Source(ref, None, params, path))
        return Slice(tuple(sources), path="models")

    def slices(self, items: Any) -> tuple[Slice, ...]:
        if not isinstance(items, list):
            self.fail("slices", "expected a list of {sources: [...]}")
            return ()
        out = []
        for i, item in enumerate(items):
            path = f"slices[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
                self.fail(path, "expected {sources: [{model: ..., layer_range: [start, end]}, ...]}")
                continue
            self.unknown_keys(item, ("sources", "base_model", "parameters", "residual_weight"), path)
            parsed = [self.source(s, f"{path}.sources[{j}]") for j, s in enumerate(item["sources"])]
            sources = [s for s in parsed if s is not None]
            base = self.model_ref(item["base_model"], f"{path}.base_model") if item.get("base_model") else None
            out.append(Slice(tuple(sources), base, self.params(item.get("parameters"), f"{path}.parameters"), path))
        return tuple(out)

    def source(self, item: Any, path: str) -> Source | None:
        if not isinstance(item, dict) or "model" not in item:
            self.fail(path, "expected {model: ..., layer_range: [start, end]}")
            return None
        self.unknown_keys(item, ("model", "layer_range", "parameters"), path)
        ref = self.model_ref(item["model"], f"{path}.model")
        lr = item.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int and x >= 0 for x in lr)
                and lr[0] < lr[1]):
            self.fail(f"{path}.layer_range", f"expected [start, end] with 0 <= start < end, got {lr!r}")
            return None
        if ref is None:
            return None
        return Source(ref, (lr[0], lr[1]), self.params(item.get("parameters"), f"{path}.parameters"), path)

    def params(self, obj: Any, path: str) -> Params:
        if obj is None:
            return ()
        if not isinstance(obj, dict):
            self.fail(path, f"expected a mapping of parameter names to values, got {obj!r}")
            return ()
        out = []
        for k, v in obj.items():
            s = self.setting(v, f"{path}.{k}")
            if s is not None:
                out.append((str(k), s))
        return tuple(out)

    def setting(self, v: Any, path: str) -> Setting | None:
        if isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, dict):
            c = self.conditional(v, path)
            return CondList((c,)) if c else None
        if isinstance(v, list):
            if all(isinstance(x, dict) for x in v) and v:
                conds = [self.conditional(x, f"{path}[{i}]") for i, x in enumerate(v)]
                return CondList(tuple(c for c in conds if c))
            if all(isinstance(x, (bool, int, float, str)) for x in v):
                return Gradient(tuple(v))
            self.fail(path, "a list must hold either plain values (a gradient) or {filter, value} entries")
            return None
        self.fail(path, f"expected a number, true/false, a list or {{filter, value}}, got {v!r}")
        return None

    def conditional(self, v: dict[str, Any], path: str) -> Conditional | None:
        if "value" not in v:
            self.fail(path, "a conditional needs a 'value' (and optionally a 'filter')")
            return None
        self.unknown_keys(v, ("filter", "value"), path)
        flt = v.get("filter")
        if flt is not None and not isinstance(flt, str):
            self.fail(f"{path}.filter", f"expected a string, got {flt!r}")
            return None
        val = v["value"]
        if isinstance(val, list) and all(isinstance(x, (bool, int, float, str)) for x in val):
            return Conditional(flt, Gradient(tuple(val)))
        if isinstance(val, (bool, int, float, str)):
            return Conditional(flt, val)
        self.fail(f"{path}.value", f"expected a value or a list of values, got {val!r}")
        return None

    def dtype(self, v: Any, path: str) -> str | None:
        if v is None:
            return None
        code = config_dtype_code(v) if isinstance(v, str) else None
        if code is None:
            self.fail(path, f"unknown dtype {v!r}; use one of {', '.join(CONFIG_DTYPES)}")
        elif code == "I64":
            self.fail(path, "int64 would cast every merged weight to a whole number (nearly all become 0); use "
                            "bfloat16, float16 or float32")
            return None
        return code

    def tokenizer(self, doc: dict[str, Any]) -> str | ModelRef | None:
        if doc.get("tokenizer") is not None and doc.get("tokenizer_source") is not None:
            self.fail("tokenizer", "give either tokenizer or tokenizer_source, not both")
            return None
        if doc.get("chat_template") is not None and (why := chat.check(doc["chat_template"])) is not None:
            self.fail("chat_template", why)
        tok = doc.get("tokenizer")
        if tok is not None:
            if not isinstance(tok, dict):
                self.fail("tokenizer", "expected {source: ..., tokens: {...}, pad_to_multiple_of: N}")
                return None
            self.unknown_keys(tok, ("source", "tokens", "pad_to_multiple_of"), "tokenizer")
            return self.tokenizer_value(tok.get("source", "union"), "tokenizer.source")
        src = doc.get("tokenizer_source")
        return None if src is None else self.tokenizer_value(src, "tokenizer_source")

    def token_specs(self, doc: dict[str, Any]) -> tuple[TokenSpec, ...]:
        tok = doc.get("tokenizer")
        tokens = tok.get("tokens") if isinstance(tok, dict) else None
        if tokens is None:
            return ()
        if not isinstance(tokens, dict):
            self.fail("tokenizer.tokens", "expected a mapping of tokens to {source: ..., force: ...}")
            return ()
        out = []
        for t, spec in tokens.items():
            path = f"tokenizer.tokens.{t}"
            spec = spec or {}
            if not isinstance(spec, dict):
                self.fail(path, "expected {source: ..., force: true|false}")
                continue
            self.unknown_keys(spec, ("source", "force"), path)
            force = spec.get("force", False)
            if not isinstance(force, bool):
                self.fail(f"{path}.force", f"expected true or false, got {force!r}")
            src = spec.get("source")
            if src is None:
                out.append(TokenSpec(str(t), "default", force=bool(force)))
            elif isinstance(src, str):
                ref = self.model_ref(src, f"{path}.source")
                if ref:
                    out.append(TokenSpec(str(t), "model", ref, force=bool(force)))
            elif isinstance(src, dict) and src.get("kind") == "zero":
                out.append(TokenSpec(str(t), "zero", force=bool(force)))
            elif isinstance(src, dict) and src.get("kind") == "model_token":
                ref = self.model_ref(src.get("model"), f"{path}.source.model")
                tid = src.get("token_id")
                name = src.get("token")
                if (tid is None) == (name is None) or (tid is not None and type(tid) is not int):
                    self.fail(f"{path}.source", "a model_token source needs exactly one of token: or token_id:")
                elif ref:
                    out.append(TokenSpec(str(t), "model_token", ref, name, tid, bool(force)))
            else:
                self.fail(f"{path}.source", "expected a model, {kind: model_token, model, token | token_id} or "
                          "{kind: zero}")
        return tuple(out)

    def pad(self, doc: dict[str, Any]) -> int | None:
        tok = doc.get("tokenizer")
        pad = tok.get("pad_to_multiple_of") if isinstance(tok, dict) else None
        if pad is not None and not (type(pad) is int and pad > 0):
            self.fail("tokenizer.pad_to_multiple_of", f"expected a positive whole number, got {pad!r}")
            return None
        return pad

    def tokenizer_value(self, v: Any, path: str) -> str | ModelRef | None:
        if v in ("union", "base"):
            return str(v)
        return self.model_ref(v, path)


_DOC_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$\n?", re.MULTILINE)


def parse_documents(text: str, source: str = "config",
                    methods: Mapping[str, Mapping[str, ParamSpec]] | None = None) -> list[MergeConfig]:
    """Parse one config, or a pipeline: several YAML documents (`---`), each with a `name`.

    In a pipeline (mergekit-multi's format) a later document may use an earlier one's name
    as a model; every document but the last must be named, names are unique.

    Raises:
        ConfigError: every problem of every document, each prefixed with its document.
    """
    parts = [p for p in _DOC_SEPARATOR.split(text) if _has_content(p)]
    if len(parts) <= 1:
        return [parse_config(parts[0] if parts else text, source, methods)]
    configs, problems = [], []
    for i, part in enumerate(parts):
        try:
            configs.append(parse_config(part, source, methods))
        except ConfigError as e:
            problems += [f"document {i + 1}: {p}" for p in e.problems]
    names = [c.name for c in configs]
    for i, c in enumerate(configs[:-1]):
        if not c.name:
            problems.append(f"document {i + 1}: name: required in a pipeline, so later stages can refer to it")
    dupes = sorted({n for n in names if n and names.count(n) > 1})
    problems += [f"name: {n!r} is used by more than one document" for n in dupes]
    if problems:
        raise ConfigError(problems, source)
    return configs


def _has_content(doc: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in doc.splitlines())


def unknown_method(name: str, known: list[str]) -> str:
    """The message for a merge_method no table has, with the nearest name."""
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"merge_method: unknown method {name!r}{hint} (available: {', '.join(known)})"


def check_parameters(cfg: MergeConfig, specs: Mapping[str, ParamSpec]) -> tuple[list[str], list[str]]:
    """(problems, notes) with the parameters for the chosen method.

    Problems: values that do not have the declared type. Notes: names the method does not
    declare, and shared parameters written under a model (mergekit ignores both silently).
    """
    problems: list[str] = []
    notes: list[str] = []
    scopes: list[tuple[str, Params, bool]] = [("parameters", cfg.parameters, False)]
    for sl in cfg.slices:
        scopes.append((f"{sl.path}.parameters", sl.parameters, False))
        scopes += [(f"{s.path}.parameters", s.parameters, True) for s in sl.sources]
    for path, params, per_model in scopes:
        for name, setting in params:
            spec = specs.get(name)
            if spec is None:
                near = difflib.get_close_matches(name, list(specs), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                known = ", ".join(sorted(specs)) or "none"
                notes.append(f"{path}.{name}: {cfg.merge_method} has no parameter {name!r}, ignored "
                             f"(it takes: {known}){hint}")
                continue
            if per_model and spec.scope == "shared":
                notes.append(f"{path}.{name}: {name!r} is shared by all models and is ignored here; "
                             "write it under the top-level or slice parameters")
            problems += _check_setting(setting, spec, f"{path}.{name}")
    return problems, notes


def _check_setting(setting: Setting, spec: ParamSpec, path: str) -> list[str]:
    if isinstance(setting, CondList):
        return [p for i, c in enumerate(setting.items)
                for p in _check_setting(c.value, spec, f"{path}[{i}].value")]
    values = setting.values if isinstance(setting, Gradient) else (setting,)
    out = []
    for i, v in enumerate(values):
        where = f"{path}[{i}]" if isinstance(setting, Gradient) else path
        try:
            value = evaluate(v, "", 0.0, spec.kind)
        except ParamTypeError as e:
            out.append(f"{where}: {e}")
            continue
        low, high = spec.bounds or (-math.inf, math.inf)
        if isinstance(value, float) and not low <= value <= high:
            out.append(f"{where}: {spec.name} must lie in [{low:g}, {high:g}], got {value:g}")
    return out
