"""Where a small call's host time goes: the pieces of a wrapper timed one by one on the device host.

    python3 tools/host_parts.py

Each line: median µs per call over chunks of calls (overhead.host_us: the device is synchronised
between chunks, outside the timing). Compare the pieces with the whole wrapper (last lines) to see
what a change can gain. (tools/host_profile.py profiles one op's call with cProfile.)
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linghe import _validate as V  # noqa: E402
from linghe import runtime  # noqa: E402
from linghe.utils import norm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import host_us  # noqa: E402  (median µs per call over chunks, device synced between)


def main():
    dev = torch.device("cuda", 0)
    x = torch.randn(1, 128, device=dev).bfloat16()
    w = torch.randn(128, device=dev).bfloat16()
    fp8, f32 = torch.float8_e4m3fn, torch.float32
    norm.triton_rms_norm_and_block_quant_forward(x, w, output_mode=0)
    (_, launch, threads, _, _), = norm._plan(dev, 128, "bf16", "bf16", 0, False)
    q = torch.empty(1, 128, dtype=fp8, device=dev)
    s = torch.empty(1, 1, dtype=f32, device=dev)
    r = torch.empty(1, dtype=f32, device=dev)
    args = (x.data_ptr(), w.data_ptr(), q.data_ptr(), s.data_ptr(), r.data_ptr(), 1, 1e-6)

    libcuda = ctypes.CDLL("libcuda.so.1")
    raw_launch = libcuda.cuLaunchKernel
    raw_launch.restype = ctypes.c_int
    raw_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    fn_handle = int(launch.function)
    launch((1, 1, 1), (threads, 1, 1), args)  # fills the parameter slots
    params = launch._params
    stream = runtime._raw_stream(0)

    buf = torch.empty(4096, dtype=torch.uint8, device=dev)
    pieces = {
        "torch.empty_strided fp8 (1,128)": lambda: torch.empty_strided((1, 128), (128, 1), dtype=fp8, device=dev),
        "torch.empty fp8 (1,128)": lambda: torch.empty((1, 128), dtype=fp8, device=dev),
        "x.new_empty fp8 (1,128)": lambda: x.new_empty((1, 128), dtype=fp8),
        "torch.empty_strided, device=int": lambda: torch.empty_strided((1, 128), (128, 1), dtype=fp8, device=0),
        "uint8 slice + view(dtype) + view(shape)": lambda: buf[256:512].view(f32).view(1, 64),
        "uint8 buffer as_strided": lambda: buf.as_strided((1, 128), (128, 1), 64),
        "x.data_ptr()": lambda: x.data_ptr(),
        "x.is_cuda + x.device": lambda: (x.is_cuda, x.device),
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "runtime._raw_stream(0)": lambda: runtime._raw_stream(0),
        "V.tensor x + weight": lambda: (V.tensor("x", x, dtypes=V.FLOATING, ndim=2),
                                        V.tensor("weight", w, dtypes=V.FLOATING, ndim=1)),
        "V.devices(5 named, 3 None)": lambda: V.devices(x=x, weight=w, out=None, scale=None, rms=None),
        "V.aligned(x)": lambda: V.aligned(x),
        "Launcher(...) (cuda.bindings cuLaunchKernel)": lambda: launch((1, 1, 1), (threads, 1, 1), args),
        "Launcher(..., pdl=True) (cuLaunchKernelEx)": lambda: launch((1, 1, 1), (threads, 1, 1), args, 0, True),
        "cuda.bindings cuLaunchKernel, args ready": lambda: runtime._drv.cuLaunchKernel(
            launch.function, 1, 1, 1, threads, 1, 1, 0, stream, params, 0),
        "ctypes libcuda cuLaunchKernel, args ready": lambda: raw_launch(
            fn_handle, 1, 1, 1, threads, 1, 1, 0, stream, params, None),
        "wrapper mode 0": lambda: norm.triton_rms_norm_and_block_quant_forward(x, w, output_mode=0),
        "wrapper mode 2": lambda: norm.triton_rms_norm_and_block_quant_forward(x, w, output_mode=2),
    }
    print(f"{torch.cuda.get_device_name(0)}  torch {torch.__version__}")
    for name, fn in pieces.items():
        print(f"{host_us(fn):8.2f} µs  {name}", flush=True)


if __name__ == "__main__":
    main()
