"""Argument checks shared by the ops, the norms and the optimizers: each raises a TypeError or
ValueError that names the argument and says what was wrong, before anything is computed."""
from __future__ import annotations

import math
import numbers

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def as_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A floating-point torch.dtype from a dtype or its name (names keep state_dicts weights_only-safe)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{name} must be one of {sorted(DTYPES)} or a floating-point torch.dtype, got {dtype!r}")


def flag(value, name: str) -> bool:
    """A bool flag: a string such as "False" would read as True, so anything else is refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


def number(value, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number in [low, high] (a 0-d real tensor is read once; bools are refused). Checked
    eagerly only: traced by torch.compile, a number that a schedule changes is symbolic."""
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        where = ("" if low == -math.inf else f" >= {low}") + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def hyper(value, name: str, low: float = -math.inf, high: float = math.inf):
    """A hyper-parameter: a number as ``number`` checks it, or a 0-d real floating-point tensor (kept a
    tensor, so that a schedule can write into it without a recompilation or a new CUDA graph). A tensor's
    value is checked where that is free (on the CPU, eagerly); a device tensor's is not (a host sync)."""
    if not isinstance(value, torch.Tensor):
        return number(value, name, low, high)
    if value.dim() != 0 or not value.is_floating_point():
        raise TypeError(f"{name} must be a real number or a 0-d floating-point tensor, got a tensor of shape "
                        f"{tuple(value.shape)} and dtype {value.dtype}")
    if value.device.type == "cpu":
        number(value, name, low, high)
    return value


def count(value, name: str, low: int = 0) -> int:
    """An int >= low (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def real_tensor(t, name: str) -> torch.Tensor:
    """A real floating-point tensor with storage (not complex, integer or meta)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    if t.is_meta:
        raise TypeError(f"{name} is a meta tensor (no data to update); materialise the model first")
    return t


def tensor_list(ts, name: str) -> list:
    """A list or tuple of tensors (a single tensor is refused: it would be read as a list of its rows)."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(ts).__name__}")
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(ts)


def like(t, ref: torch.Tensor, name, ref_name: str) -> None:
    """``t`` is a real floating-point tensor with ``ref``'s shape and device (a broadcastable shape would
    silently update every row); its dtype may differ (e.g. fp32 gradients or momentum of bf16 weights).
    ``name`` may be a function giving it, called only to word an error (steps check every param)."""
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and t.shape == ref.shape
            and t.device == ref.device):
        return
    name = name() if callable(name) else name
    real_tensor(t, name)
    raise ValueError(f"{name} (shape {tuple(t.shape)}, {t.device}) must have the shape and device of {ref_name} "
                     f"(shape {tuple(ref.shape)}, {ref.device})")
