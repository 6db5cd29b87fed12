"""Resolve a model reference to a local folder: a path, or a Hugging Face id in the local cache.

Imports errors and config. Never touches the network: an id is looked up in the cache
folders Hugging Face itself uses (HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME, ~/.cache).
"""

from __future__ import annotations

import os

from .config import ModelRef
from .errors import InputError


def cache_dirs() -> list[str]:
    """The Hugging Face hub cache folders to search, most specific first, without duplicates."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        dirs.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(xdg, "huggingface", "hub"))
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs))


def resolve_model(ref: ModelRef) -> str:
    """The folder holding model `ref`.

    Args:
        ref: a local folder (absolute or relative to the working directory), or a
            Hugging Face id `org/name` with an optional revision (branch, tag or commit).
    Returns:
        An absolute folder path.
    Raises:
        InputError: not found; the message lists every place it looked.
    Example:
        >>> resolve_model(ModelRef("mistralai/Mistral-7B-v0.1"))
        '/home/me/.cache/huggingface/hub/models--mistralai--Mistral-7B-v0.1/snapshots/…'
    """
    local = os.path.expanduser(ref.path)
    if os.path.isdir(local):
        if ref.revision:
            raise InputError(f"model {ref}: {local} is a local folder, which has no revisions; "
                             f"drop '@{ref.revision}'")
        return os.path.abspath(local)
    looked = [f"{os.path.abspath(local)} (local folder)"]
    repo = "models--" + ref.path.strip("/").replace("/", "--")
    for cache in cache_dirs():
        folder = os.path.join(cache, repo)
        looked.append(folder)
        snap = _snapshot(folder, ref.revision or "main")
        if snap:
            return snap
    raise InputError(
        f"model {ref}: not a local folder and not in the local Hugging Face cache (no network is used).\n"
        + "  looked in:\n" + "".join(f"    {p}\n" for p in looked)
        + f"  fix: download it once (huggingface-cli download {ref.path}), set HF_HUB_CACHE to the cache "
        "that holds it, or write a local folder path in the config"
    )


def _snapshot(folder: str, revision: str) -> str | None:
    ref_file = os.path.join(folder, "refs", revision)
    commit = revision
    if os.path.isfile(ref_file):
        with open(ref_file) as f:
            commit = f.read().strip()
    snap = os.path.join(folder, "snapshots", commit)
    return os.path.abspath(snap) if os.path.isdir(snap) else None
