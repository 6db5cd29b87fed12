"""Finish an output folder: config.json, tokenizer, card, manifest, shard renames, index — in that order.

Imports plan, writer, dtypes, errors. An output that looks complete is complete: the
manifest is written after every shard is synced, then shards are renamed from .partial,
then `model.safetensors.index.json` (several shards) is written last.
"""

from __future__ import annotations

import json
import os
import re

import xxhash

from ._version import __version__
from .dtypes import config_name
from .errors import InputError
from .journal import WORK_DIR, Entry, crash_point
from .planner import INPUT_KEY_SEP, Model, Plan, Task
from .writer import PARTIAL, fsync_dir, write_file_atomic

MANIFEST = "streammerge.manifest.json"
MANIFEST_FORMAT = "streammerge-manifest/1"
INDEX = "model.safetensors.index.json"
FILES_RECORD = "files.json"  # in the work folder: the files finalisation writes, hashed before they are
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")
OWNED_FILES = (MANIFEST, INDEX, "config.json", "generation_config.json", "README.md", "mergekit_config.yml",
               *TOKENIZER_FILES)


def finished_output(out: str) -> bool:
    """True if `out` holds a finished streammerge merge: a merge's manifest and no run in progress.

    A manifest written by `streammerge hash` has no plan fingerprint: that folder is somebody's
    model, never ours to replace.
    """
    return (os.path.isfile(os.path.join(out, MANIFEST)) and not os.path.exists(os.path.join(out, WORK_DIR))
            and manifest_field(out, "plan_fingerprint") is not None)


def manifest_field(out: str, key: str) -> str | None:
    """A string field of `out`'s manifest (plan_fingerprint, config, ...), if readable."""
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            value = json.load(f).get(key)
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def finalize(plan: Plan, out: str, entries: dict[str, Entry], shard_hashes: dict[str, str],
             copy_tokenizer: bool = True, write_card: bool = True, stage: str | None = None) -> str:
    """Write everything but the weights, then the manifest, rename shards, write the index.

    Each step can be repeated after a kill: files are replaced atomically and a shard
    already renamed by an earlier attempt stays renamed. The files' hashes are recorded in the
    work folder before they are written, and in the manifest, so what streammerge wrote can be
    told from what a user put there (only the former is ever replaced or removed).

    Returns:
        The xxh3-128 of the manifest file, the output's one-line identity.
    """
    files = output_files(plan, out, copy_tokenizer, write_card)
    index = files.pop(INDEX, None)
    record = file_record({**files, **({INDEX: index} if index is not None else {})})
    write_file_atomic(os.path.join(out, WORK_DIR, FILES_RECORD), json.dumps(record, sort_keys=True).encode())
    for name, data in files.items():
        write_file_atomic(os.path.join(out, name), data)
    crash_point("card-written")
    body = make_manifest(plan, entries, shard_hashes, record)
    if stage is not None:
        body["pipeline_stage"] = stage  # whose intermediate this is: only that pipeline replaces it
    manifest = json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
    write_file_atomic(os.path.join(out, MANIFEST), manifest)
    crash_point("manifest-written")
    for shard in plan.shards:
        partial = os.path.join(out, shard.name + PARTIAL)
        if os.path.exists(partial):
            os.replace(partial, os.path.join(out, shard.name))
            crash_point("shard-renamed")
    fsync_dir(out)
    if index is not None:
        write_file_atomic(os.path.join(out, INDEX), index)
        crash_point("index-written")
    return xxhash.xxh3_128_hexdigest(manifest)


def content_hash(plan: Plan, shard_hashes: dict[str, str]) -> str:
    """The merge's identity by content: xxh3-128 over every shard's name and xxh3-128 (headers and
    all tensor bytes), the same wherever the inputs or the output lie. The manifest keeps the
    provenance (input folders, their identities) beside it."""
    h = xxhash.xxh3_128()
    for s in plan.shards:
        h.update(f"{s.name}\0{shard_hashes[s.name]}\n".encode())
    return h.hexdigest()


def output_files(plan: Plan, out: str, copy_tokenizer: bool = True, write_card: bool = True) -> dict[str, bytes]:
    """Every file of the output but the shards and the manifest, by name, as it will be written."""
    files = {"config.json": _config_bytes(plan)}
    if copy_tokenizer:
        files.update(_tokenizer_files(plan))
    if write_card:
        files["mergekit_config.yml"] = plan.config.text.encode()
        files["README.md"] = model_card(plan, os.path.basename(os.path.abspath(out))).encode()
    if len(plan.shards) > 1:
        files[INDEX] = json.dumps(shard_index(plan), indent=2).encode() + b"\n"
    return files


def file_record(files: dict[str, bytes]) -> dict[str, dict[str, object]]:
    return {name: {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)} for name, data in files.items()}


def owned_files(out: str) -> set[str]:
    """The files of `out` that streammerge provably wrote and that are unchanged since: those its
    manifest (or an unfinished run's record) lists, with the same hash (shards: the same size),
    and the manifest itself. Everything else in `out` is somebody else's."""
    ours: set[str] = set()
    manifest = _json_object(os.path.join(out, MANIFEST))
    if manifest is not None and isinstance(manifest.get("plan_fingerprint"), str):
        ours.add(MANIFEST)
        shards = manifest.get("shards")
        for name, meta in (shards.items() if isinstance(shards, dict) else []):
            path = os.path.join(out, str(name))
            if _plain_name(name) and isinstance(meta, dict) and _regular(path) and \
                    os.path.getsize(path) == meta.get("size"):
                ours.add(name)
        files = manifest.get("files")
        if files is None:  # written before manifests listed their files: the names streammerge writes
            ours.update(n for n in OWNED_FILES if _regular(os.path.join(out, n)))
        ours.update(_matching(out, files))
    ours.update(_matching(out, _json_object(os.path.join(out, WORK_DIR, FILES_RECORD))))
    return ours


def recorded_files(out: str) -> set[str]:
    """The non-shard files a finished merge's manifest lists."""
    files = (_json_object(os.path.join(out, MANIFEST)) or {}).get("files")
    return set(files) if isinstance(files, dict) else set()


def _matching(out: str, record: object) -> set[str]:
    found = set()
    for name, meta in (record.items() if isinstance(record, dict) else []):
        path = os.path.join(out, str(name))
        if _plain_name(name) and isinstance(meta, dict) and _regular(path) and \
                os.path.getsize(path) == meta.get("size"):
            with open(path, "rb") as f:
                if xxhash.xxh3_128_hexdigest(f.read()) == meta.get("xxh3_128"):
                    found.add(name)
    return found


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _regular(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _json_object(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def shard_index(plan: Plan) -> dict[str, object]:
    """The Hugging Face shard index: total size and which shard holds each tensor."""
    return {"metadata": {"total_size": plan.total_bytes, "streammerge_version": __version__},
            "weight_map": {t.name: plan.shards[t.shard].name for t in plan.tasks}}


def report_record(plan: Plan, t: Task, entry: Entry) -> dict[str, object]:
    """What `streammerge report` shows of one tensor: its inputs, resolved parameters, and what the
    merge did (the statistics the run recorded; none for a copied tensor)."""
    return {"models": [str(plan.models[i.model].ref) for i in t.inputs], "base": t.ctx.base, "t": t.t,
            "shared": t.ctx.shared, "per_input": list(t.ctx.input_params), "stats": entry.stats}


def make_manifest(plan: Plan, entries: dict[str, Entry], shard_hashes: dict[str, str],
                  files: dict[str, dict[str, object]] | None = None) -> dict[str, object]:
    """The manifest: what was merged from what, and the xxh3-128 of every tensor and shard.

    Inputs carry the xxh3-128 of every input tensor's bytes as the merge read them, so
    `streammerge verify --inputs` can tell whether the inputs still hold the same data.
    """
    read: dict[str, dict[str, str]] = {}
    for e in entries.values():
        for key, digest in e.inputs.items():
            ref, tensor = key.split(INPUT_KEY_SEP, 1)
            read.setdefault(ref, {})[tensor] = digest
    return {
        "format": MANIFEST_FORMAT,
        "streammerge_version": __version__,
        "plan_fingerprint": plan.fingerprint,
        "content_xxh3_128": content_hash(plan, shard_hashes),
        "layout_fingerprint": plan.layout_fingerprint,
        "seed": plan.seed,
        "merge_method": plan.method.name,
        "config": plan.config.text,
        "inputs": [{"model": str(m.ref), "folder": m.folder, "identity_xxh3_128": m.identity,
                    "tensors": dict(sorted(read.get(str(m.ref), {}).items()))} for m in plan.models],
        "shards": {s.name: {"size": s.size, "header_bytes": len(s.header), "xxh3_128": shard_hashes[s.name]}
                   for s in plan.shards},
        "tensors": {t.name: {"shard": plan.shards[t.shard].name, "offset": t.begin, "nbytes": t.nbytes,
                             "dtype": t.out_dtype, "shape": list(t.shape), "xxh3_128": entries[t.name].xxh3_128,
                             "fingerprint": t.fingerprint, "report": report_record(plan, t, entries[t.name])}
                    for t in plan.tasks},
        "files": files or {},
    }


def _config_bytes(plan: Plan) -> bytes:
    donor = plan.models[plan.donor]
    path = os.path.join(donor.folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the donor model's config.json ({e}); the output needs one") from e
    dtypes = {t.out_dtype for t in plan.tasks}
    if len(dtypes) == 1:
        name = config_name(dtypes.pop())
        cfg["dtype"] = name  # transformers v5's key (SEMANTICS §1.5)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name  # older readers: keep the two consistent
    if plan.out_num_layers is not None:
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["num_hidden_layers"] = plan.out_num_layers  # a multimodal model's language stack
        else:
            cfg["num_hidden_layers"] = plan.out_num_layers
    if plan.vocab_size is not None:
        cfg["vocab_size"] = plan.vocab_size
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _tokenizer_files(plan: Plan) -> dict[str, bytes]:
    src = plan.models[plan.tokenizer_donor].folder
    files: dict[str, bytes] = {}
    if plan.tokenizer_json is not None:  # rebuilt for the output vocabulary
        files["tokenizer.json"] = plan.tokenizer_json.encode()
    template = plan.chat_template
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if name == "tokenizer.json" and plan.tokenizer_json is not None:
            continue
        if template is not None and name in ("chat_template.jinja", "chat_template.json"):
            continue  # replaced by the configured template below
        path = os.path.join(src, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            if template is not None and name == "tokenizer_config.json":
                data = _with_template(path, data, template)
            files[name] = data
    if template is not None:
        # transformers 5 reads (and mergekit's output carries) chat_template.jinja; older readers the key
        files["chat_template.jinja"] = template.encode()
    return files


def _with_template(path: str, data: bytes, template: str) -> bytes:
    """tokenizer_config.json with its `chat_template` set to `template`."""
    try:
        cfg = json.loads(data)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e}); the chat template cannot be set in it") from e
    cfg["chat_template"] = template
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(m: Model) -> str | None:
    """The Hub repository a model came from: an `org/name` reference found in a Hugging Face cache
    (its folder is a cache snapshot), else None (a local folder, whatever its name looks like)."""
    path = m.ref.base.path
    cached = f"{os.sep}models--" in m.folder and f"{os.sep}snapshots{os.sep}" in m.folder
    return path if _HUB_ID.fullmatch(path) and cached else None


def model_card(plan: Plan, title: str) -> str:
    """A README.md with front matter the Hugging Face Hub understands: base_model lists only models
    that came from the Hub; the body names the base model and every input."""
    refs = [str(m.ref) for m in plan.models]
    base = plan.config.base_model
    hub = sorted({h for m in plan.models if (h := hub_id(m)) is not None})
    front = ["---", "base_model:"] + [f"- {r}" for r in hub] if hub else ["---"]
    front += ["base_model_relation: merge", "library_name: transformers", "tags:", "- merge", "- mergekit",
              "- streammerge", "---"]
    m = plan.method
    using = f" using {base} as a base" if base is not None else ""
    others = [r for r in refs if base is None or r != str(base)]
    dtype = config_name(plan.tasks[0].out_dtype) if plan.tasks else None
    lines = front + [
        f"# {title}", "",
        "This is a merge of pre-trained language models created with streammerge, a memory-frugal "
        "streaming merger that reads mergekit configurations.", "",
        "## Merge Method", "",
        f"This model was merged using the [{m.pretty or m.name}]({m.url}) merge method{using}.", "",
        "### Models Merged", "", "The following models were included in the merge:",
        *[f"* {r}" for r in others], "",
        "### Configuration", "", "```yaml", plan.config.text.rstrip("\n"), "```", "",
        "### Verifying this download", "",
        f"`{MANIFEST}` holds the xxh3-128 hash of every tensor and shard"
        + (f" (weights stored as {dtype})" if dtype else "") + ". Check the files with:", "",
        "```", "streammerge verify .", "```", "",
    ]
    return "\n".join(lines)
