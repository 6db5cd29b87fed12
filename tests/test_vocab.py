"""Vocabularies (SEMANTICS §3.6): with `tokenizer_source: union` the output tokenizer is the base's
plus every token the others add, and each model's embedding and head rows are aligned to it —
a token a model lacks takes the default row (the only holder's, else the base's, else the
holders' average). The ChatML token of the one model that has it gets exactly that model's rows,
and transformers loads the result and tokenizes the new token to its new id."""

from __future__ import annotations

import json
import os

import make_models
import numpy as np
import pytest
import torch
from helpers import assert_golden
from safetensors.torch import load_file

from streammerge.config import parse_config
from streammerge.executor import Executor
from streammerge.options import RunOptions
from streammerge.overlap import RingArena
from streammerge.planner import make_plan
from streammerge.reader import InputReader
from streammerge.schedule import make_schedule


def tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for n in os.listdir(folder):
        if n.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, n)))
    return out


@pytest.fixture
def three_vocabs(tmp_path) -> list[str]:
    base, extra, chat = (str(tmp_path / n) for n in ("base", "extra", "chat"))
    tiny = make_models.PRESETS["tiny"]
    make_models.write_set([base, chat], tiny, seed=3)
    make_models.write_set([extra], make_models.Shape(64, 160, 4, 4, 2, 130), seed=4)  # w128, w129 more
    path = os.path.join(chat, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    vocab["<|im_start|>"] = vocab.pop("w127")  # the chat model lacks w127 and has a ChatML token at 127
    with open(path, "w") as f:
        json.dump(tok, f)
    return [base, extra, chat]


def test_union_tokenizer_aligns_rows(three_vocabs, tmp_path) -> None:
    base, extra, chat = three_vocabs
    cfg = parse_config(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {extra}\n"
                       f"  - model: {chat}\nparameters: {{weight: 1.0}}\ntokenizer_source: union\ndtype: float32\n")
    plan = make_plan(cfg)
    assert plan.vocab_size == 131
    out = str(tmp_path / "out")
    # one-row blocks: gathering crosses every boundary
    Executor(plan, out, RunOptions(max_memory=1 << 33, chunk_bytes=1)).run()
    assert_golden("vocab/union", out)
    got = tensors(out)
    b, e, c = (tensors(f) for f in three_vocabs)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        g = got[name].double()
        assert g.shape == (131, 64)
        bb, ee, cc = b[name].double(), e[name].double(), c[name].double()
        np.testing.assert_allclose(g[:127], (bb[:127] + ee[:127] + cc[:127]) / 3, rtol=1e-6)
        np.testing.assert_allclose(g[127], (bb[127] + ee[127] + bb[127]) / 3, rtol=1e-6)  # chat lacks w127: base's row
        np.testing.assert_allclose(g[128:130], ee[128:130], rtol=1e-6)  # only 'extra' has w128, w129
        np.testing.assert_allclose(g[130], cc[127], rtol=1e-6)  # <|im_start|>: the chat model's own row
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 131
    from streammerge.verifier import verify

    assert verify(out, check_inputs=True).inputs_checked == 3  # gathered rows record no input hash
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "w129", "w5"]) == [130, 129, 5]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 129, 130]])).logits
    assert logits.shape == (1, 3, 131) and torch.isfinite(logits).all()


def test_gathered_rows_take_the_configs_dtype_in_their_own_block(three_vocabs, tmp_path) -> None:
    """`dtype: bfloat16` rounds rows aligned to a new vocabulary (here a float32 model's) as it
    rounds rows read as they are, and in the block the reader was given: the budget counts that
    block, not a rounded copy of it beside it."""
    base, _, chat = three_vocabs
    extra = str(tmp_path / "extra32")
    make_models.write_set([extra], make_models.Shape(64, 160, 4, 4, 2, 130), seed=4, dtype=torch.float32)

    def first_block(dtype: str) -> tuple[torch.Tensor, RingArena]:
        cfg = parse_config(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                           f"  - model: {extra}\n  - model: {chat}\nparameters: {{weight: 1.0}}\n"
                           f"tokenizer_source: union\ndtype: {dtype}\n")
        plan = make_plan(cfg)
        ti = next(i for i, t in enumerate(plan.tasks) if t.vocab is not None)
        sched = make_schedule(plan, 1 << 34, overlap=False, chunk_bytes=1 << 20).only([ti])  # one block
        arena = RingArena(sched.arena)
        return InputReader(plan, torch.device("cpu"), arena).load(sched.reads()[0]), arena

    wide, _ = first_block("float32")
    x, arena = first_block("bfloat16")
    assert arena._buf is not None
    block, buffer = x.untyped_storage().data_ptr(), arena._buf.untyped_storage().data_ptr()
    assert block == buffer  # (ints: a failing assert shows them, not the buffer's bytes)
    assert x.dtype == wide.dtype and torch.equal(x, wide.to(torch.bfloat16).to(wide.dtype))
    assert not torch.equal(wide, wide.to(torch.bfloat16).to(wide.dtype))  # some gathered row is rounded


def test_base_tokenizer_keeps_base_rows(three_vocabs, tmp_path) -> None:
    base, extra, chat = three_vocabs
    cfg = parse_config(f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {chat}\n"
                       "parameters: {weight: 1.0}\ntokenizer_source: base\ndtype: float32\n")
    plan = make_plan(cfg)
    assert plan.vocab_size == 128
    out = str(tmp_path / "out")
    Executor(plan, out, RunOptions(max_memory=1 << 33)).run()
    g = tensors(out)["model.embed_tokens.weight"].double()
    bb, cc = tensors(base)["model.embed_tokens.weight"].double(), tensors(chat)["model.embed_tokens.weight"].double()
    np.testing.assert_allclose(g[:127], (bb[:127] + cc[:127]) / 2, rtol=1e-6)
    np.testing.assert_allclose(g[127], bb[127], rtol=1e-6)  # the chat model's w127 is missing: base's row


def test_token_overrides_and_padding(three_vocabs, tmp_path) -> None:
    base, extra, chat = three_vocabs
    cfg = parse_config(f"""merge_method: linear
base_model: {base}
models:
  - model: {base}
  - model: {chat}
parameters: {{weight: 1.0}}
dtype: float32
tokenizer:
  source: base
  pad_to_multiple_of: 48
  tokens:
    w5:
      source: {{kind: model_token, model: {chat}, token: "<|im_start|>"}}
      force: true
    "<|im_start|>":
      source: {chat}
    "<new>":
      source: {{kind: zero}}
""")
    plan = make_plan(cfg)
    assert plan.vocab_size == 144  # 128 + <|im_start|> + <new> = 130 -> padded to 3 x 48
    out = str(tmp_path / "out")
    Executor(plan, out, RunOptions(max_memory=1 << 33, chunk_bytes=1)).run()
    g = tensors(out)["model.embed_tokens.weight"].double()
    bb = tensors(base)["model.embed_tokens.weight"].double()
    cc = tensors(chat)["model.embed_tokens.weight"].double()
    assert g.shape == (144, 64)
    np.testing.assert_allclose(g[5], cc[127], rtol=1e-6)  # forced for every model from the chat model's token
    np.testing.assert_allclose(g[128], cc[127], rtol=1e-6)  # <|im_start|>: base lacks it, takes chat's row
    assert not g[129].any()  # <new>: zeros
    own = [bb.clone(), cc.clone()]  # each model's aligned matrix, for the padding means
    own[0][5], own[1][5] = cc[127], cc[127]
    own[1][127] = bb[127]  # chat lacks w127: the base's row
    aligned = [torch.cat([m[:128], cc[127:128], torch.zeros(1, 64)]) for m in own]
    want_pad = (aligned[0].mean(0) + aligned[1].mean(0)) / 2
    np.testing.assert_allclose(g[130:], want_pad.expand(14, 64), rtol=1e-5, atol=1e-7)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 144
