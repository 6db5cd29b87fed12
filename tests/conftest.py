"""Fixtures: tiny Mistral-shaped model sets, made once per session with tools/make_models.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
sys.path.insert(0, os.path.dirname(__file__))

import make_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A base and three fine-tunes, 4 layers, two shards each."""
    root = tmp_path_factory.mktemp("tiny")
    folders = [str(root / n) for n in ("base", "ft1", "ft2", "ft3")]
    make_models.write_set(folders, make_models.PRESETS["tiny"], seed=1, shard_bytes=120_000)
    return folders


@pytest.fixture(scope="session")
def seed_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seed configs' 16 input models (32 layers, tiny) in a Hugging Face cache layout."""
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    make_models.make_seed_cache(cache, make_models.PRESETS["tiny32"], seed=2, shard_bytes=400_000)
    return cache
