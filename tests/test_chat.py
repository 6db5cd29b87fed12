"""chat_template: `auto` takes the template most inputs carry, built-in names give each family's
published format (rendered by transformers as a chat model would, compared with strings written
by hand from the formats), a literal template is written as given, invalid values are config
errors, and the output carries the template in tokenizer_config.json and chat_template.jinja."""

from __future__ import annotations

import json
import os
from pathlib import Path

import make_hub
import pytest
from click.testing import CliRunner

from streammerge import chat
from streammerge.cli import main

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
EXPECTED = {  # (without, with) the generation prompt, for CONV
    "chatml": ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n",
               "<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nand 3+3?<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": ("<s> [INST] be brief\n\n2+2? [/INST] 4</s> [INST] and 3+3? [/INST]", ""),
    "alpaca": ("be brief\n\n### Instruction:\n2+2?\n\n### Response:\n4\n\n### Instruction:\nand 3+3?",
               "\n\n### Response:\n"),
    "exaone": ("[|system|]be brief[|endofturn|]\n[|user|]2+2?\n[|assistant|]4[|endofturn|]\n[|user|]and 3+3?\n",
               "[|assistant|]"),
}


def render(template: str, conv: list[dict], gen: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template(conversations=[conv], chat_template=template, add_generation_prompt=gen,
                                 bos_token="<s>", eos_token="</s>")[0][0]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_render_the_published_formats(name) -> None:
    pytest.importorskip("transformers")
    plain, prompt = EXPECTED[name]
    assert render(chat.BUILTIN[name], CONV, False) == plain
    assert render(chat.BUILTIN[name], CONV, True) == plain + prompt


def test_mistral_refuses_roles_out_of_turn() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(Exception, match="alternate"):
        render(chat.BUILTIN["mistral"], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False)


@pytest.mark.parametrize("value,why", [
    ("chatmlx", "unknown built-in template 'chatmlx'"),
    ("{{ x }}", "at least 20 characters"),
    (42, "expected a string"),
])
def test_invalid_values_are_config_errors(tmp_path, tiny_set, value, why) -> None:
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {tiny_set[0]}}}]\nparameters: {{weight: 1}}\n"
                   f"chat_template: {json.dumps(value)}\n")
    r = CliRunner().invoke(main, ["plan", str(cfg)])
    assert r.exit_code == 3 and "chat_template" in r.output and why in r.output, r.output


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> str:
    cache = str(tmp_path_factory.mktemp("hub"))
    repos = [r for r in make_hub.SEED_REPOS if r.repo_id in (
        "mistralai/Mistral-7B-v0.1", "teknium/OpenHermes-2.5-Mistral-7B", "ehartford/dolphin-2.2.1-mistral-7b",
        "mistralai/Mistral-7B-Instruct-v0.2")]
    make_hub.make_hub(cache, make_hub.PRESETS["tiny"], seed=4, repos=repos)
    return cache


def _merge(hub: str, tmp_path: Path, setting: str, models: list[str]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    cfg = tmp_path / "m.yml"
    cfg.write_text("merge_method: linear\nbase_model: mistralai/Mistral-7B-v0.1\nmodels:\n"
                   + "".join(f"  - model: {m}\n" for m in models) + "parameters: {weight: 1}\n"
                   + "tokenizer: {source: base}\n" + f"chat_template: {json.dumps(setting)}\n")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"], env={"HF_HUB_CACHE": hub})
    assert r.exit_code == 0, r.output
    return out


def _written(out: Path) -> str:
    text = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == text
    return text


def test_auto_takes_the_template_most_inputs_carry(hub, tmp_path) -> None:
    # two ChatML models (.bin and both formats) and one Mistral: ChatML wins, though the base has none
    out = _merge(hub, tmp_path, "auto", ["mistralai/Mistral-7B-v0.1", "teknium/OpenHermes-2.5-Mistral-7B",
                                         "ehartford/dolphin-2.2.1-mistral-7b", "mistralai/Mistral-7B-Instruct-v0.2"])
    assert _written(out) == make_hub.CHATML.strip()
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_auto_tie_goes_to_the_first_and_names_are_written(hub, tmp_path) -> None:
    out = _merge(hub, tmp_path / "a", "auto", ["mistralai/Mistral-7B-Instruct-v0.2",
                                               "teknium/OpenHermes-2.5-Mistral-7B"])
    assert _written(out) == make_hub.MISTRAL
    out = _merge(hub, tmp_path / "b", "chatml", ["mistralai/Mistral-7B-Instruct-v0.2"])
    assert _written(out) == chat.BUILTIN["chatml"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = _merge(hub, tmp_path / "c", literal, ["mistralai/Mistral-7B-Instruct-v0.2"])
    assert _written(out) == literal
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "hey"
    assert not os.path.exists(out / "chat_template.json")
