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
from .format import read_header
from .index import INDEX_FILE, SINGLE_FILE, ModelIndex
from .journal import WORK_DIR
from .output import MANIFEST, MANIFEST_FORMAT

READ_BYTES = 16 << 20


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
    rep = Report()
    by_shard: dict[str, list[tuple[str, dict]]] = {}
    for name, t in manifest.get("tensors", {}).items():
        by_shard.setdefault(t["shard"], []).append((name, t))
    for shard, meta in sorted(manifest.get("shards", {}).items()):
        rep.shards += 1
        rep.tensors += len(by_shard.get(shard, []))
        rep.problems += _check_shard(os.path.join(out, shard), meta, by_shard.get(shard, []))
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
    whole = xxhash.xxh3_128()
    tensors = sorted(tensors, key=lambda x: x[1]["offset"])
    with open(path, "rb") as f:
        head = f.read(meta["header_bytes"])
        whole.update(head)
        for tname, t in tensors:
            h = xxhash.xxh3_128()
            f.seek(t["offset"])
            left = t["nbytes"]
            while left > 0:
                block = f.read(min(READ_BYTES, left))
                if not block:
                    break
                h.update(block)
                whole.update(block)
                left -= len(block)
            end = t["offset"] + t["nbytes"]
            if left > 0:
                problems.append(f"tensor {tname}: shard {name} bytes {t['offset']}..{end}: past the end of the file")
            elif h.hexdigest() != t["xxh3_128"]:
                problems.append(f"tensor {tname}: shard {name} bytes {t['offset']}..{end}: content differs")
        whole.update(f.read())
    if whole.hexdigest() != meta["xxh3_128"] and not problems:
        problems.append(f"shard {name}: header or padding bytes differ (bytes 0..{meta['header_bytes']})")
    return problems


def _check_input(inp: dict) -> list[str]:
    folder, label = inp.get("folder", ""), inp.get("model", "?")
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
                f.seek(ref.entry.begin)
                left = ref.entry.nbytes
                while left > 0:
                    block = f.read(min(READ_BYTES, left))
                    h.update(block)
                    left -= len(block)
            if h.hexdigest() != digest:
                problems.append(f"input {label}: tensor {tname} in {os.path.basename(ref.shard)} bytes "
                                f"{ref.entry.begin}..{ref.entry.end} differs from what the merge read")
    finally:
        index.close()
    return problems


def hash_folder(folder: str, sha256: bool = False) -> dict[str, object]:
    """A manifest (shards and tensors with xxh3-128, optionally sha256 per shard) for any safetensors folder.

    The sha256 of a shard is what the Hugging Face Hub shows for the file (its LFS oid).
    """
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        with open(os.path.join(folder, INDEX_FILE)) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        names = [SINGLE_FILE]
    else:
        raise InputError(f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}; not a safetensors model folder")
    shards: dict[str, object] = {}
    tensors: dict[str, object] = {}
    for name in names:
        path = os.path.join(folder, name)
        hdr = read_header(path)
        whole, sha = xxhash.xxh3_128(), hashlib.sha256()
        with open(path, "rb") as f:
            head = f.read(hdr.data_start)
            whole.update(head)
            sha.update(head)
            for t in hdr.tensors.values():  # in data order, which tiles the file
                h = xxhash.xxh3_128()
                left = t.nbytes
                while left > 0:
                    block = f.read(min(READ_BYTES, left))
                    h.update(block)
                    whole.update(block)
                    if sha256:
                        sha.update(block)
                    left -= len(block)
                tensors[t.name] = {"shard": name, "offset": t.begin, "nbytes": t.nbytes, "dtype": t.dtype,
                                   "shape": list(t.shape), "xxh3_128": h.hexdigest()}
            rest = f.read()
            whole.update(rest)
            sha.update(rest)
        entry: dict[str, object] = {"size": hdr.file_size, "header_bytes": hdr.data_start,
                                    "xxh3_128": whole.hexdigest()}
        if sha256:
            entry["sha256"] = sha.hexdigest()
        shards[name] = entry
    return {"format": MANIFEST_FORMAT, "shards": shards, "tensors": tensors}
