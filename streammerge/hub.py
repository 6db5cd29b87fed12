"""Resolve a model reference to a local folder: a path, or a Hugging Face id in the local cache.

Imports errors and config. Never touches the network: an id is looked up in the cache
folders Hugging Face itself uses (HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME, ~/.cache).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

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


class ModelNotFound(InputError):
    """A model reference that is neither a local folder nor in the local Hugging Face cache."""

    def __init__(self, ref: ModelRef, looked: list[str]) -> None:
        self.ref, self.looked = ref, looked
        super().__init__(
            f"model {ref}: not a local folder and not in the local Hugging Face cache (no network is used).\n"
            + "  looked in:\n" + "".join(f"    {p}\n" for p in looked)
            + f"  fix: download it once ({download_command(ref)}), set HF_HUB_CACHE to the cache that holds "
            "it, or write a local folder path in the config")


def download_command(ref: ModelRef) -> str:
    """The command of the installed Hugging Face client that fetches `ref` into the cache."""
    tool = "hf" if shutil.which("hf") or not shutil.which("huggingface-cli") else "huggingface-cli"
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return f"{tool} download {ref.path}{rev}"


def resolve_model(ref: ModelRef) -> str:
    """The folder holding model `ref`.

    Args:
        ref: a local folder (absolute or relative to the working directory), or a
            Hugging Face id `org/name` with an optional revision (branch, tag or commit).
    Returns:
        An absolute folder path.
    Raises:
        ModelNotFound: not found; the message lists every place it looked.
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
    raise ModelNotFound(ref, looked)


def resolve_models(refs: Iterable[ModelRef]) -> dict[ModelRef, str]:
    """Every model of `refs`, resolved; when some are missing, one error lists them all.

    Raises:
        InputError: the missing models, the caches looked in, and one download command per model.
    """
    found: dict[ModelRef, str] = {}
    missing: list[ModelNotFound] = []
    for ref in dict.fromkeys(refs):
        try:
            found[ref] = resolve_model(ref)
        except ModelNotFound as e:
            missing.append(e)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        raise InputError(
            f"{len(missing)} models are not local folders and not in the local Hugging Face cache "
            "(no network is used):\n" + "".join(f"  - {e.ref}\n" for e in missing)
            + "  looked in the local folders named and in:\n" + "".join(f"    {d}\n" for d in cache_dirs())
            + "  fix: download them once:\n" + "".join(f"    {download_command(e.ref)}\n" for e in missing)
            + "  or set HF_HUB_CACHE to the cache that holds them, or write local folder paths in the config")
    return found


def _snapshot(folder: str, revision: str) -> str | None:
    ref_file = os.path.join(folder, "refs", revision)
    commit = revision
    if os.path.isfile(ref_file):
        with open(ref_file) as f:
            commit = f.read().strip()
    snap = os.path.join(folder, "snapshots", commit)
    return os.path.abspath(snap) if os.path.isdir(snap) else None
