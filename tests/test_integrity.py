"""Resume trusts nothing it has not checked: after a real SIGKILL mid-run, generated damage to what
the run left (bytes flipped inside journaled tensors of the .partial shards, journal lines
corrupted, torn journal tails, kills again during the resume) ends, on the same command, in a
folder byte-identical to an uninterrupted run — never exit 0 with other bytes."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from test_resume import config, run, snapshot


@pytest.fixture(scope="module")
def uninterrupted(tiny_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    cfg = config(root, tiny_set)
    out = str(root / "out")
    trace = str(root / "trace.txt")
    assert run(cfg, out, trace=trace).returncode == 0
    with open(trace) as f:
        appends = [i + 1 for i, line in enumerate(f) if line.split()[1] == "journal-synced"]
    return cfg, snapshot(out), appends


def killed(cfg: str, out: str, at: int) -> str:
    r = run(cfg, out, crash_at=at)
    assert r.returncode == -9, r.stderr
    return os.path.join(out, ".streammerge", "journal.jsonl")


def journaled(journal: str) -> list[dict]:
    """The journal's well-formed entries, read independently of streammerge."""
    out = []
    with open(journal, "rb") as f:
        for line in f:
            try:
                e = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("offset"), int):
                out.append(e)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_flipped_bytes_in_journaled_tensors_are_merged_again(uninterrupted, tmp_path, seed) -> None:
    cfg, want, appends = uninterrupted
    rng = random.Random(seed)
    out = str(tmp_path / "out")
    entries = journaled(killed(cfg, out, appends[rng.randrange(1, len(appends))]))
    assert entries
    for e in rng.sample(entries, min(len(entries), rng.randint(1, 3))):
        with open(os.path.join(out, e["shard"] + ".partial"), "r+b") as f:
            pos = e["offset"] + rng.randrange(e["nbytes"])
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    r = run(cfg, out)
    assert r.returncode == 0, r.stderr
    assert "no longer match their bytes on disk" in r.stderr
    assert snapshot(out) == want


@pytest.mark.parametrize("damage", ["torn tail", "garbage line", "truncated mid-line", "bad entry fields"])
def test_a_damaged_journal_loses_no_valid_line_across_repeated_kills(uninterrupted, tmp_path, damage) -> None:
    cfg, want, appends = uninterrupted
    out = str(tmp_path / "out")
    journal = killed(cfg, out, appends[len(appends) // 3])
    with open(journal, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    if damage == "torn tail":
        data += b'{"name": "model.layers.1.mlp.up_pr'
    elif damage == "garbage line":
        data = b"".join(lines[:1] + [b"\x00\xffnot json\n"] + lines[1:])
    elif damage == "truncated mid-line":
        data = data[:-7]
    else:
        data += b'{"name": 3, "shard": [], "offset": "x"}\n' + b"[1, 2]\n"
    with open(journal, "wb") as f:
        f.write(data)
    valid = {e["name"] for e in journaled(journal)}
    # resume, killed again after some appends, then resumed to the end
    r = run(cfg, out, crash_at=appends[2])
    assert r.returncode == -9
    after = {e["name"] for e in journaled(journal)}
    assert valid < after  # every valid line kept, and the resume's own lines readable after them
    r = run(cfg, out)
    assert r.returncode == 0, r.stderr
    m = re.search(r"resuming an interrupted run: (\d+) of", r.stderr)
    assert m and int(m.group(1)) == len(after), r.stderr  # streammerge itself kept every one of them
    assert snapshot(out) == want
