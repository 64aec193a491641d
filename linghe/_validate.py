"""Argument checks shared by the wrappers. Every message names the argument."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FLOATING = (torch.bfloat16, torch.float16, torch.float32)
DTYPE_TAG = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def tensor(name: str, value, *, dtypes=None, ndim=None) -> torch.Tensor:
    """Type, rank and dtype of one argument. Devices are checked last, by :func:`devices`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def devices(**named) -> torch.device:
    """All given tensors (None skipped) are CUDA tensors on one device; returns it.

    Checked after shapes and dtypes, so those checks can be tested without a GPU.
    """
    device, first = None, None
    for name, value in named.items():
        if value is None:
            continue
        if not value.is_cuda:
            raise ValueError(f"{name} must be a CUDA tensor, got device {value.device}")
        if device is None:
            device, first = value.device, name
        elif value.device != device:
            raise ValueError(f"{name} is on {value.device} but {first} is on {device}")
    return device


def output(name: str, value, expected_shape: tuple, dtype) -> torch.Tensor:
    """A caller-supplied output buffer: right shape, dtype, contiguous (device: see :func:`devices`)."""
    tensor(name, value, dtypes=(dtype,))
    shape(name, value, expected_shape)
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return value


def aligned(value: torch.Tensor, alignment: int = 16) -> torch.Tensor:
    """Contiguous and with a base address the kernels' vector loads accept (copies only if needed)."""
    value = value.contiguous()
    if value.data_ptr() % alignment:
        value = value.clone()
    return value


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def integer(name: str, value, minimum: int = 0) -> int:
    """A Python integer argument (bool rejected) that is at least ``minimum``."""
    import operator

    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value

