"""Disk full: on a real 1 MiB tmpfs left with too little room, the merge stops with a clear
message (exit 6) and nothing that looks finished; after space is freed the same command
resumes and ends with the bytes of a run that never ran out of space."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from launch import streammerge


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"CANNOT MOUNT A SMALL TMPFS HERE (needs root), disk-full handling is untested: {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def run(cfg: str, out: str):
    return streammerge("run", cfg, out, "--out-shard-size", "60K")


def files(out: str) -> dict[str, bytes]:
    result = {}
    for n in sorted(os.listdir(out)):
        with open(os.path.join(out, n), "rb") as f:
            result[n] = f.read()
    return result


def shard_pages(cfg: str) -> int:
    """Bytes the output shards take on a 4 KiB-page filesystem."""
    r = streammerge("plan", cfg, "--json", "--out-shard-size", "60K")
    return sum(-(-s["size"] // 4096) * 4096 for s in json.loads(r.stdout)["shards"])


def test_too_little_space_is_refused_before_any_work(tiny_set, small_disk, tmp_path) -> None:
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {f}\n" for f in tiny_set)
                   + "parameters: {weight: 0.25}\n")
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 200 * 1024))  # ~200 KB left, ~380 KB needed
    out = str(small_disk / "out")
    r = run(str(cfg), out)
    assert r.returncode == 6 and "not enough disk space: the output needs" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any(n.startswith("model") for n in os.listdir(out))


def test_disk_full_mid_run_then_resume(tiny_set, small_disk, tmp_path) -> None:
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {f}\n" for f in tiny_set)
                   + "parameters: {weight: 0.25}\n")
    clean = str(tmp_path / "clean" / "out")
    assert run(str(cfg), clean).returncode == 0
    # room for the shards and three pages more: the journal and the finishing files run out of space
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - shard_pages(str(cfg)) - 3 * 4096))
    out = str(small_disk / "out")
    r = run(str(cfg), out)
    assert r.returncode == 6, r.stderr
    assert "disk full; free some space and run the same command again to resume" in r.stderr
    assert "Traceback" not in r.stderr
    names = os.listdir(out)
    assert "streammerge.manifest.json" not in names and "model.safetensors.index.json" not in names
    filler.unlink()
    r = run(str(cfg), out)
    assert r.returncode == 0, r.stderr
    assert "resuming an interrupted run" in r.stderr
    assert files(out) == files(clean)
