"""Check an output folder against its manifest; write a manifest for any safetensors folder.

Imports output, index, format, errors (and xxhash, hashlib). Every tensor and shard is
re-hashed in one sequential read per shard; every problem is listed (tensor, shard, byte
range), none stops the check early.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import xxhash

from .errors import InputError, IntegrityError
from .format import FileHeader, TensorEntry, blocks, preader
from .index import ModelIndex
from .journal import WORK_DIR
from .output import MANIFEST, MANIFEST_FORMAT


@dataclass
class Report:
    """What a verification found."""

    tensors: int = 0
    shards: int = 0
    inputs_checked: int = 0
    problems: list[str] = field(default_factory=list)


def verify(out: str, check_inputs: bool = False) -> Report:
    """Re-hash every tensor and shard of `out` against its manifest.

    Raises:
        IntegrityError: listing every mismatch, missing or truncated shard, or a missing manifest.
    Example:
        >>> verify("merged").tensors
        291
    """
    path = os.path.join(out, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        hint = (" (a streammerge run is unfinished there: run the same command again)"
                if os.path.isdir(os.path.join(out, WORK_DIR)) else
                "; `streammerge hash` writes one for any safetensors folder")
        raise IntegrityError(f"{out}: no {MANIFEST}, nothing to verify against{hint}") from e
    except ValueError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e}); the manifest itself is damaged") from e
    try:
        return _verify(out, manifest, check_inputs)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise IntegrityError(f"{path}: the manifest is malformed ({type(e).__name__}: {str(e)[:200]}); "
                             "it cannot be checked against") from None


def _verify(out: str, manifest: dict, check_inputs: bool) -> Report:
    if not isinstance(manifest, dict):
        raise TypeError(f"a JSON {type(manifest).__name__}, not an object")
    rep = Report()
    by_shard: dict[str, list[tuple[str, dict]]] = {}
    for name, t in manifest.get("tensors", {}).items():
        by_shard.setdefault(t["shard"], []).append((name, t))
    for shard, meta in sorted(manifest.get("shards", {}).items()):
        rep.shards += 1
        rep.tensors += len(by_shard.get(shard, []))
        rep.problems += _check_shard(os.path.join(out, shard), meta, by_shard.get(shard, []))
    files = manifest.get("files", {})
    for name, meta in sorted(files.items() if isinstance(files, dict) else []):
        rep.problems += _check_file(out, name, meta)
    if check_inputs:
        for inp in manifest.get("inputs", []):
            rep.inputs_checked += 1
            rep.problems += _check_input(inp)
    if rep.problems:
        raise IntegrityError("\n".join([f"{out}: {len(rep.problems)} problem(s) found"]
                                       + [f"  - {p}" for p in rep.problems]))
    return rep


def _check_shard(path: str, meta: dict, tensors: list[tuple[str, dict]]) -> list[str]:
    name = os.path.basename(path)
    if not os.path.exists(path):
        return [f"shard {name}: missing"] + [f"tensor {t}: in missing shard {name}" for t, _ in tensors]
    size = os.path.getsize(path)
    problems = []
    if size != meta["size"]:
        problems.append(f"shard {name}: {size} bytes, expected {meta['size']} (truncated or extended)")
    entries = [TensorEntry(t, "U8", (m["nbytes"],), m["offset"], m["offset"] + m["nbytes"]) for t, m in tensors]
    whole, _, digests = _hash_file(FileHeader(path, meta["header_bytes"], size, {e.name: e for e in entries}, {}),
                                   False)
    for tname, t in sorted(tensors, key=lambda x: x[1]["offset"]):
        end = t["offset"] + t["nbytes"]
        if end > size:
            problems.append(f"tensor {tname}: shard {name} bytes {t['offset']}..{end}: past the end of the file")
        elif digests[tname] != t["xxh3_128"]:
            problems.append(f"tensor {tname}: shard {name} bytes {t['offset']}..{end}: content differs")
    if whole != meta["xxh3_128"] and not problems:
        problems.append(f"shard {name}: header or padding bytes differ (bytes 0..{meta['header_bytes']})")
    return problems


def _check_file(out: str, name: str, meta: object) -> list[str]:
    """A file of the output other than a shard (config.json, the tokenizer, the shard index...)."""
    path = os.path.join(out, name)
    if not isinstance(meta, dict) or "/" in name:
        return [f"file {name}: the manifest's entry is malformed"]
    if not os.path.isfile(path):
        return [f"file {name}: missing"]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in blocks(preader(f), 0, os.fstat(f.fileno()).st_size):
            h.update(block)
    if h.hexdigest() != meta.get("xxh3_128"):
        return [f"file {name}: content differs from what the merge wrote"]
    return []


def _check_input(inp: dict) -> list[str]:
    folder, label = inp.get("folder", ""), inp.get("model", "?")
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return [f"input {label}: its folder {folder} is gone; the inputs cannot be checked"]
    try:
        index = ModelIndex(folder, label)
    except InputError as e:
        return [f"input {label}: {e}"]
    problems = []
    try:
        for tname, digest in sorted(inp.get("tensors", {}).items()):
            ref = index.tensors.get(tname)
            if ref is None:
                problems.append(f"input {label}: tensor {tname} is gone from {folder}")
                continue
            h = xxhash.xxh3_128()
            with open(ref.shard, "rb") as f:
                for block in blocks(preader(f), ref.entry.begin, ref.entry.nbytes):
                    h.update(block)
            if h.hexdigest() != digest:
                problems.append(f"input {label}: tensor {tname} in {os.path.basename(ref.shard)} bytes "
                                f"{ref.entry.begin}..{ref.entry.end} differs from what the merge read")
    finally:
        index.close()
    return problems


def hash_folder(folder: str, sha256: bool = False) -> dict[str, object]:
    """A manifest (shards and tensors with xxh3-128, optionally sha256 per shard) for any model folder
    of safetensors or PyTorch `.bin` shards.

    The sha256 of a shard is what the Hugging Face Hub shows for the file (its LFS oid).
    """
    try:
        index = ModelIndex(folder, folder)
    except InputError as e:
        raise InputError(f"{e}\n  (hash reads safetensors or PyTorch .bin model folders)") from None
    index.close()
    shards: dict[str, object] = {}
    tensors: dict[str, object] = {}
    for name, hdr in sorted(index.headers.items()):
        whole, sha, digests = _hash_file(hdr, sha256)
        for t in hdr.tensors.values():
            if index.tensors.get(t.name, None) is not None and index.tensors[t.name].entry == t:
                tensors[t.name] = {"shard": name, "offset": t.begin, "nbytes": t.nbytes, "dtype": t.dtype,
                                   "shape": list(t.shape), "xxh3_128": digests[t.name]}
        entry: dict[str, object] = {"size": hdr.file_size, "header_bytes": hdr.data_start, "xxh3_128": whole}
        if sha256:
            entry["sha256"] = sha
        shards[name] = entry
    return {"format": MANIFEST_FORMAT, "shards": shards, "tensors": tensors}


def _hash_file(hdr: FileHeader, sha256: bool) -> tuple[str, str, dict[str, str]]:
    """(xxh3-128 of the file, its sha256 or "", xxh3-128 per tensor). One sequential read when the
    tensors tile the file after its header (safetensors); a second, per tensor, when they do not (a
    zip checkpoint's records have local headers between them, and storages may be shared)."""
    whole, sha = xxhash.xxh3_128(), hashlib.sha256()
    ranges = sorted(hdr.tensors.values(), key=lambda t: t.begin)
    tiles = all(a.end == b.begin for a, b in zip(ranges, ranges[1:])) and (not ranges or
                                                                          ranges[0].begin == hdr.data_start)
    digests: dict[str, str] = {}
    def feed(block: bytes) -> None:
        whole.update(block)
        if sha256:
            sha.update(block)

    with open(hdr.path, "rb") as f:
        read, size = preader(f), os.fstat(f.fileno()).st_size
        pos = 0
        for t in ranges if tiles else []:
            if t is ranges[0]:
                for block in blocks(read, 0, hdr.data_start):
                    feed(block)
            h = xxhash.xxh3_128()
            for block in blocks(read, t.begin, t.nbytes):
                h.update(block)
                feed(block)
            digests[t.name] = h.hexdigest()
            pos = t.end
        for block in blocks(read, pos, max(0, size - pos)):
            feed(block)
        for t in [] if tiles else ranges:
            h = xxhash.xxh3_128()
            for block in blocks(read, t.begin, t.nbytes):
                h.update(block)
            digests[t.name] = h.hexdigest()
    return whole.hexdigest(), sha.hexdigest() if sha256 else "", digests
