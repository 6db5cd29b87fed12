"""PyTorch `.bin` inputs: the zip checkpoint's tensor table read without running its pickle.

Generated state dicts (dtypes, shapes from scalars to 3-D, views at storage offsets, shared
storages) read row by row equal what torch.load gives; a pickle that would run code is refused
before anything runs (the code's side effect is checked for); legacy, compressed, non-contiguous
and damaged files get clear errors naming the file; a folder with both formats is read as
safetensors; `hash`, `verify --inputs` and the manifest cover `.bin` inputs.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import make_models
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.cli import main
from streammerge.errors import InputError
from streammerge.index import ModelIndex
from streammerge.torchzip import read_torch_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


def _tensor(draw, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = 1
    for d in shape:
        n *= d
    pad = draw(st.integers(0, 3))  # elements before the tensor in its storage: a view at an offset
    base = (torch.arange(n + pad) * 7 % 13 - 6)
    base = base > 0 if dtype == torch.bool else base.to(dtype)
    return base[pad:].reshape(shape)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    names = draw(st.lists(st.from_regex(r"model\.[a-z]{1,6}(\.[0-9]{1,2})?\.weight", fullmatch=True),
                          min_size=1, max_size=6, unique=True))
    sd = {n: _tensor(draw, draw(st.sampled_from(DTYPES))) for n in names}
    if len(names) > 1 and draw(st.booleans()):
        sd[names[-1]] = sd[names[0]]  # tied: two names, one storage
    return sd


@settings(max_examples=40, deadline=None)
@given(sd=state_dicts())
def test_rows_of_a_bin_equal_torch_load(tmp_path_factory, sd) -> None:
    folder = tmp_path_factory.mktemp("bin")
    torch.save(sd, folder / "pytorch_model.bin")
    want = torch.load(folder / "pytorch_model.bin", weights_only=True)
    idx = ModelIndex(str(folder))
    try:
        assert set(idx.tensors) == set(want)
        for name, t in want.items():
            ref = idx.tensors[name]
            got = idx.read_rows(name, 0, ref.rows).reshape(t.shape)
            assert got.dtype == t.dtype and torch.equal(got, t), name
    finally:
        idx.close()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _zip_with_pickle(path: str, obj: object) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/byteorder", "little")


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tiny_set, tmp_path) -> None:
    marker = tmp_path / "ran"
    model = tmp_path / "evil"
    model.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (model / f).write_bytes((tmp_path / ".." / "x").parent.joinpath(tiny_set[0], f).read_bytes())
    _zip_with_pickle(str(model / "pytorch_model.bin"), {"model.embed_tokens.weight": _Evil(str(marker))})
    with pytest.raises(InputError, match="refused: its pickle asks for posix.system|refused: its pickle asks for os"):
        read_torch_header(str(model / "pytorch_model.bin"))
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {tiny_set[0]}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {model}\n    parameters: {{weight: 1}}\n")
    for cmd in (["plan", str(cfg)], ["run", str(cfg), str(tmp_path / "out")]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 4, r.output
        assert "refused" in r.output and "pytorch_model.bin" in r.output and "Nothing from it was executed" in r.output
        assert "Traceback" not in r.output
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload", [
    {"w": [1, 2, 3]},  # a state dict of lists, no tensors: empty, not an error by itself
    "just a string",
])
def test_a_pickle_without_tensors_is_not_a_model(tmp_path, payload) -> None:
    path = tmp_path / "pytorch_model.bin"
    _zip_with_pickle(str(path), payload)
    if isinstance(payload, dict):
        assert read_torch_header(str(path)).tensors == {}
    else:
        with pytest.raises(InputError, match="not a state dict"):
            read_torch_header(str(path))


def test_legacy_compressed_noncontiguous_and_damaged_files_name_the_file(tmp_path) -> None:
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.bin: a PyTorch checkpoint in the legacy format"):
        read_torch_header(str(legacy))

    view = tmp_path / "view.bin"
    torch.save({"w": torch.arange(6.0).reshape(2, 3).t()}, view)
    with pytest.raises(InputError, match=r"view\.bin.*tensor 'w' is stored as a non-contiguous view"):
        read_torch_header(str(view))

    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(4, 4)}, good)
    compressed = tmp_path / "compressed.bin"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(compressed, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info),
                         zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED)
    with pytest.raises(InputError, match=r"compressed\.bin.*is compressed"):
        read_torch_header(str(compressed))

    cut = tmp_path / "cut.bin"
    cut.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(InputError, match=r"cut\.bin"):
        read_torch_header(str(cut))


def test_sharded_bin_and_both_formats(tmp_path) -> None:
    folders = [str(tmp_path / "st")]
    make_models.write_set(folders, make_models.PRESETS["tiny"], seed=3, shard_bytes=60_000)
    st_idx = ModelIndex(folders[0])
    weights = {n: st_idx.read_rows(n, 0, r.rows).reshape(r.entry.shape) for n, r in st_idx.tensors.items()}
    both = tmp_path / "both"
    os.symlink(folders[0], both)
    names = sorted(weights)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    binf = tmp_path / "bin"
    binf.mkdir()
    for shard, group in halves.items():
        torch.save({n: weights[n] for n in group}, binf / shard)
        torch.save({n: weights[n] for n in group}, os.path.join(folders[0], shard))
    wm = {"metadata": {}, "weight_map": {n: s for s, g in halves.items() for n in g}}
    for f in (binf, folders[0]):
        with open(os.path.join(f, "pytorch_model.bin.index.json"), "w") as fh:
            json.dump(wm, fh)
    bin_idx, both_idx = ModelIndex(str(binf)), ModelIndex(str(both))
    assert all(s.endswith(".bin") for s in bin_idx.headers)
    assert all(s.endswith(".safetensors") for s in both_idx.headers)  # safetensors wins, as in mergekit
    for n, t in weights.items():
        assert torch.equal(bin_idx.read_rows(n, 0, bin_idx.tensors[n].rows).reshape(t.shape), t)
    # hash covers .bin folders: per-tensor digests equal the safetensors copy's (same bytes)
    r1 = CliRunner().invoke(main, ["hash", str(binf)])
    r2 = CliRunner().invoke(main, ["hash", folders[0]])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    t1, t2 = json.loads(r1.output)["tensors"], json.loads(r2.output)["tensors"]
    assert {n: v["xxh3_128"] for n, v in t1.items()} == {n: v["xxh3_128"] for n, v in t2.items()}
    # and hash --write then verify works on a .bin folder, and finds a flipped byte
    r = CliRunner().invoke(main, ["hash", str(binf), "--write"])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["verify", str(binf)]).exit_code == 0
    ref = bin_idx.tensors[names[0]]
    with open(ref.shard, "r+b") as f:
        f.seek(ref.entry.begin)
        b = f.read(1)
        f.seek(ref.entry.begin)
        f.write(bytes([b[0] ^ 1]))
    r = CliRunner().invoke(main, ["verify", str(binf)])
    assert r.exit_code != 0 and names[0] in r.output, r.output
