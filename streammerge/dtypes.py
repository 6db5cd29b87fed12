"""Data types: safetensors dtype codes, torch dtypes and config dtype names.

The safetensors code ("BF16") and the torch dtype are kept distinct: headers speak codes,
kernels speak torch. torch is imported when a torch dtype is first asked for, not with this
module: the config parser needs only the names, and with it `streammerge --help` and every
usage error answer without the seconds importing torch takes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors code -> (torch's name of the dtype, bytes per element)
_CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


@functools.cache
def _torch_dtypes() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str]]:
    """(code -> torch dtype, torch dtype -> code), made on first use."""
    import torch

    by_code = {code: getattr(torch, name) for code, (name, _) in _CODES.items()}
    return by_code, {dt: code for code, dt in by_code.items()}

# names accepted in a config's `dtype` / `out_dtype` (SEMANTICS §1.1; `torch.` prefix allowed)
CONFIG_DTYPES: dict[str, str] = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
}


def known_code(code: str) -> bool:
    """True if `code` is a safetensors dtype code streammerge can read."""
    return code in _CODES


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code, e.g. "BF16" -> torch.bfloat16."""
    return _torch_dtypes()[0][code]


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code."""
    return _CODES[code][1]


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype."""
    return _torch_dtypes()[1][dtype]


def is_float(code: str) -> bool:
    """True for floating-point codes."""
    return code in ("F64", "F32", "F16", "BF16")


def config_dtype_code(name: str) -> str | None:
    """The code for a config dtype name ("bfloat16", "torch.float16"), or None if unknown."""
    name = name.removeprefix("torch.")
    return CONFIG_DTYPES.get(name)


def config_name(code: str) -> str:
    """The config/HF name of a code ("BF16" -> "bfloat16")."""
    for name, c in CONFIG_DTYPES.items():
        if c == code:
            return name
    return code.lower()


def promote(codes: list[str]) -> str:
    """PyTorch's promotion folded over `codes` in order (bf16+fp16 -> fp32)."""
    import torch

    dt = torch_dtype(codes[0])
    for c in codes[1:]:
        dt = torch.promote_types(dt, torch_dtype(c))
    return code_of(dt)


def compute_dtype(code: str) -> torch.dtype:
    """Kernels compute in float32, or float64 for float64 data (SEMANTICS deviation 1)."""
    return torch_dtype("F64" if code == "F64" else "F32")
