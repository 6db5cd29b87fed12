"""Chat templates: mergekit's `chat_template` key resolved to the template the output carries.

Imports errors. The value is `auto` (the template most input models share), a built-in name
(`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`: a short string with no newline and no `{`),
or a literal Jinja template (at least 20 characters, with a `{`), as in mergekit 0.1.5 (SEMANTICS
§5.4). The built-in templates are written here from each family's published format; `chatml`
and `mistral` render exactly as mergekit's files do, while `llama3`, `alpaca` and `exaone`
render without the stray newlines and indentation that mergekit's files add (README).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable

from .errors import InputError

CHATML = ("{%- for message in messages %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3 = ("{%- for message in messages %}"
          "{%- if loop.first %}{{- bos_token }}{%- endif %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
          " + '<|eot_id|>' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

MISTRAL = ("{%- set rest = messages %}"
           "{%- if messages and messages[0]['role'] == 'system' %}"
           "{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}"
           "{%- endif %}"
           "{{- bos_token }}"
           "{%- for message in rest %}"
           "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{- raise_exception('after an optional system message, roles must alternate user, assistant, user, ...') }}"
           "{%- endif %}"
           "{%- if message['role'] == 'user' %}"
           "{%- set text = (system + '\\n\\n' + message['content']) if loop.first and system is defined"
           " else message['content'] %}"
           "{{- ' [INST] ' + text + ' [/INST]' }}"
           "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
           "{%- endfor %}")

ALPACA = ("{%- set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
          "{%- if systems %}{{- systems[-1]['content'] | trim + '\\n\\n' }}{%- endif %}"
          "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list %}"
          "{%- set heads = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} %}"
          "{%- for message in turns if message['role'] in heads %}"
          "{%- if not loop.first %}{{- '\\n\\n' }}{%- endif %}"
          "{{- heads[message['role']] + '\\n' + message['content'] | trim }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt and turns and turns[-1]['role'] != 'assistant' %}"
          "{{- '\\n\\n### Response:\\n' }}{%- endif %}")

EXAONE = ("{%- for message in messages %}"
          "{%- if loop.first and message['role'] != 'system' %}{{- '[|system|][|endofturn|]\\n' }}{%- endif %}"
          "{{- '[|' + message['role'] + '|]' + message['content'] }}"
          "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}")

BUILTIN = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def check(value: object) -> str | None:
    """Why `value` is not a valid `chat_template` setting, or None if it is."""
    if not isinstance(value, str):
        return f"expected a string (auto, a built-in name or a Jinja template), got {type(value).__name__}"
    if value == "auto" or value in BUILTIN:
        return None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return f"unknown built-in template {value!r}; use auto, one of {', '.join(BUILTIN)}, or a Jinja template"
    if len(value) < 20 or "{" not in value:
        return "a literal template must be a Jinja template (at least 20 characters, with '{')"
    return None


def model_template(folder: str) -> str | None:
    """The chat template a model's tokenizer carries: tokenizer_config.json's `chat_template` (a
    string, or a list of named templates whose `default` counts), else chat_template.jinja, else
    chat_template.json."""
    cfg = _json(os.path.join(folder, "tokenizer_config.json"))
    value = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(value, str) and value:
        return value
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read() or None
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{jinja}: cannot read the chat template ({e})") from e
    data = _json(os.path.join(folder, "chat_template.json"))
    value = data.get("chat_template") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def resolve(value: str | None, folders: Iterable[str]) -> str | None:
    """The template text for the setting `value`, given the input models' folders in config order.

    `auto` takes the template most inputs carry (whitespace at the ends ignored; a tie goes to the
    one met first); None when no input has one, so the donor's files are kept as they are.
    """
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in (model_template(f) for f in dict.fromkeys(folders)) if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN.get(value, value)


def _json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e}); re-download the model's tokenizer files") from e
