"""The safetensors format layer: exact header bytes, a writer the safetensors library reads,
and a clear error naming the file for every kind of corrupt or truncated shard."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge.errors import InputError
from streammerge.format import build_header, read_header


def test_header_golden_bytes() -> None:
    header, ranges = build_header([("b", "BF16", (1, 3)), ("a", "F32", (2,))], {"format": "pt"})
    text = b'{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[1,3],"data_offsets":[0,6]},' \
           b'"a":{"dtype":"F32","shape":[2],"data_offsets":[6,14]}}'
    text += b" " * (-len(text) % 8)
    assert header == struct.pack("<Q", len(text)) + text
    assert ranges == [(len(header), len(header) + 6), (len(header) + 6, len(header) + 14)]


ZOO = {  # edge tensors: scalar, empty, bf16, 3-D, int64
    "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "bf16": torch.randn(3, 5).bfloat16(),
    "cube": torch.randn(2, 3, 4), "ints": torch.arange(6, dtype=torch.int64),
}


def test_written_file_reads_back_with_safetensors(tmp_path) -> None:
    items = list(ZOO.items())
    header, ranges = build_header([(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[t.dtype],
                                    tuple(t.shape)) for n, t in items], {"format": "pt"})
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        for _, t in items:
            f.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    loaded = load_file(str(path))
    for n, t in items:
        assert torch.equal(loaded[n], t)
    hdr = read_header(str(path))
    assert [hdr.tensors[n].begin for n, _ in items] == [b for b, _ in ranges]


def test_reads_files_written_by_safetensors(tmp_path) -> None:
    path = tmp_path / "lib.safetensors"
    save_file({k: v for k, v in ZOO.items()}, str(path), {"format": "pt"})
    hdr = read_header(str(path))
    assert hdr.tensors["cube"].shape == (2, 3, 4) and hdr.tensors["bf16"].dtype == "BF16"
    assert hdr.metadata == {"format": "pt"}


def _file(tmp_path, header: dict, data: bytes = b"", raw: bytes | None = None):
    text = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize("header,data,raw,fragment", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "gap"),
    ({}, b"", b"{not json", "not valid JSON"),
])
def test_corrupt_headers_name_the_file(tmp_path, header, data, raw, fragment) -> None:
    path = _file(tmp_path, header, data, raw)
    with pytest.raises(InputError) as e:
        read_header(path)
    assert path in str(e.value) and fragment in str(e.value)


def test_short_and_oversized_header_length(tmp_path) -> None:
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="too short"):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(InputError, match="first 8 bytes are not a header length that fits the 10-byte file"):
        read_header(str(p))
