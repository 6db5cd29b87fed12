"""Rough edges a new user hits: the model card's base_model holds only Hub ids and its body names
the base; budget messages never say `needs 0MiB`; one unit style in messages."""

from __future__ import annotations

import os
import shutil

from click.testing import CliRunner

import streammerge
from streammerge.cli import main
from streammerge.units import mib_str, parse_size, size_str


def test_card_lists_only_hub_models_and_names_the_base(tiny_set, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.makedirs("acme")
    shutil.copytree(tiny_set[0], "acme/base")  # a local folder whose name looks like a Hub id
    shutil.copytree(tiny_set[1], "acme/tuned")
    text = ("merge_method: slerp\nbase_model: acme/base\nmodels:\n  - model: acme/base\n  - model: acme/tuned\n"
            "parameters: {t: 0.5}\n")
    streammerge.merge(text, "out", max_memory="4GiB")
    with open("out/README.md") as f:
        card = f.read()
    front = card.split("---")[1]
    assert "acme/" not in front and "base_model:" not in front  # no Hub model: no base_model list
    assert "using acme/base as a base" in card and "* acme/tuned" in card


def test_sizes_read_and_written_one_way() -> None:
    assert parse_size("512MiB") == 512 << 20 and parse_size("5B") == 5 * 10**9 and parse_size(" 2 GiB ") == 2 << 30
    assert size_str(8 * 1024) == "8.00 KiB" and size_str(3 << 30) == "3.00 GiB" and size_str(12) == "12 B"
    assert mib_str(8 * 1024) == "1MiB" and mib_str(0) == "0MiB" and mib_str(3 << 20) == "3MiB"


def test_a_budget_message_never_says_needs_0mib(tiny_set, tmp_path) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n  - model: {tiny_set[1]}\n"
                   "parameters: {weight: 1}\n")
    r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "o"), "--max-memory", "9MiB"])
    assert r.exit_code == 5 and "is too small" in r.output
    assert "needs 0MiB" not in r.output and "KiB for one row" in r.output, r.output


def test_help_shows_defaults_readably() -> None:
    r = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert "[default: 5B]" in r.output and "(5B)" not in r.output


PIPELINE = """name: first
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1}}
  - model: {b}
    parameters: {{weight: 2}}
---
merge_method: slerp
base_model: first
models:
  - model: first
  - model: {c}
parameters: {{t: 0.4}}
"""


def test_the_identity_printed_is_the_content_wherever_inputs_and_stages_lie(tiny_set, tmp_path) -> None:
    runs = []
    for where in ("x", "y/deeper"):
        folders = [shutil.copytree(f, tmp_path / where / "in" / os.path.basename(f)) for f in tiny_set[:3]]
        cfg = tmp_path / where / "p.yml"
        cfg.write_text(PIPELINE.format(a=folders[0], b=folders[1], c=folders[2]))
        r = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / where / "out"), "-q"])
        assert r.exit_code == 0, r.output
        runs.append(r.output.strip().splitlines()[-1].split("content xxh3-128 ")[1])
        with open(tmp_path / where / "out" / "streammerge.manifest.json") as f:
            runs.append(f.read())
    assert runs[0] == runs[2] and len(runs[0]) == 32  # the same content, printed alike
    assert runs[1] != runs[3]  # the manifests keep each run's provenance (its input folders)


def test_explain_headings_fit_the_method(tiny_set, tmp_path) -> None:
    ties = tmp_path / "t.yml"
    ties.write_text(f"merge_method: dare_ties\nbase_model: {tiny_set[0]}\nmodels:\n  - model: {tiny_set[0]}\n"
                    f"  - model: {tiny_set[1]}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    r = CliRunner().invoke(main, ["plan", str(ties), "--explain", "model.layers.1.mlp.up_proj.weight"])
    assert r.exit_code == 0 and "(layer 1)" in r.output and "position" not in r.output, r.output
    slerp = tmp_path / "s.yml"
    slerp.write_text(f"merge_method: slerp\nbase_model: {tiny_set[0]}\nmodels:\n  - model: {tiny_set[0]}\n"
                     f"  - model: {tiny_set[1]}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n"
                     "    - value: 0.5\n")
    r = CliRunner().invoke(main, ["plan", str(slerp), "--explain", "model.norm.weight"])
    assert "(not a layer tensor)" in r.output and "t = 0.5" in r.output and "t = 0 " not in r.output, r.output
    r = CliRunner().invoke(main, ["plan", str(slerp), "--explain", "model.layers.3.self_attn.q_proj.weight"])
    assert "(layer 3; gradients read at position 1 of its slice)" in r.output, r.output


def test_plan_on_a_pipeline_shows_every_stage(tiny_set, tmp_path) -> None:
    cfg = tmp_path / "p.yml"
    cfg.write_text(PIPELINE.format(a=tiny_set[0], b=tiny_set[1], c=tiny_set[2]))
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("pipeline of 2 stages: first, stage2")
    assert "== stage 1/2 first" in r.output and "== stage 2/2 stage2" in r.output and "?" not in r.output.split("\n")[0]
    assert "model 0: first  (written by an earlier stage)" in r.output


def test_the_bar_on_a_terminal_uses_one_unit_style(tiny_set, tmp_path) -> None:
    import pty
    import subprocess
    import sys

    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n  - model: {tiny_set[1]}\n"
                   "parameters: {weight: 1}\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", "run", str(cfg), str(tmp_path / "o")],
                            stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(60) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    bars = [ln for ln in screen.replace("\r", "\n").splitlines() if "read:" in ln and "tensors saved" in ln]
    assert bars, screen
    final = bars[-1]
    assert "100%" in final and "39/39 tensors saved" in final and " of " in final and "/s" in final
    assert "RSS " in final and "MiB" in final and "MB" not in final.replace("MiB", ""), final


def test_readme_says_what_a_user_needs_and_names_only_files_it_has() -> None:
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # the CPU-only torch on a user's machine
    assert "## Reproduce the seed merge" in text and "examples/mistral-7b-merge-14-pipeline.yml" in text
    assert "GPU tests are skipped" in text and re.search(r"about \w+ minutes on two cores", text)  # suite time
    assert 'max_memory="2GiB"' in text  # the API, with sizes as the command line writes them
    for name in set(re.findall(r"\b([\w./-]+\.(?:md|yml|py|sh))\b", text)):
        if name in {"merge.yml", "mergekit_config.yml", "README.md"}:
            continue  # the user's own config in the usage examples; files of an output folder
        places = [name] if "/" in name else [name, *(os.path.join(d, name) for d in
                                                      ("streammerge", "tools", "tests", "examples"))]
        assert any(os.path.exists(os.path.join(root, p)) for p in places), f"README names {name}, which is not here"
