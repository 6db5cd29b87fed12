"""Data types: safetensors dtype codes, torch dtypes and config dtype names.

Imports only torch. The safetensors code ("BF16") and the torch dtype are kept distinct:
headers speak codes, kernels speak torch.
"""

from __future__ import annotations

import torch

# safetensors code -> (torch dtype, bytes per element)
_CODES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_BY_TORCH = {dt: code for code, (dt, _) in _CODES.items()}

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
    return _CODES[code][0]


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code."""
    return _CODES[code][1]


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype."""
    return _BY_TORCH[dtype]


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
    dt = torch_dtype(codes[0])
    for c in codes[1:]:
        dt = torch.promote_types(dt, torch_dtype(c))
    return code_of(dt)


def compute_dtype(code: str) -> torch.dtype:
    """Kernels compute in float32, or float64 for float64 data (SEMANTICS deviation 1)."""
    return torch.float64 if code == "F64" else torch.float32
