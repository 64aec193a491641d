"""Per-device module loading and kernel launch on torch's current stream.

A cubin is loaded once per device (into that device's primary context, the
one torch uses). The launch path is one ``cuLaunchKernel`` on
``torch.cuda.current_stream(device)``: no host sync, no host->device copy, so
launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import ctypes
import threading

import torch

ARG_TYPES = {
    "ptr": ctypes.c_void_p,
    "i32": ctypes.c_int32,
    "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
    # A by-value struct (e.g. a pointer table): pass a ctypes.Structure instance; the launch hands
    # its address to cuLaunchKernel, which copies sizeof(parameter) bytes from it.
    "struct": None,
}

try:  # the raw-pointer accessor inductor uses; fall back to the public API
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - older torch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


# Programmatic dependent launch for launches that ask for it (pdl=True); off: ordinary launches
# (for A/B timing: tools/bench.py --set linghe.runtime:PDL=False).
PDL = True


class CudaDriverError(RuntimeError):
    pass


_drv = None  # cuda.bindings.driver, imported on first use (CPU-only users never need it)
_SUCCESS = None


_RETRY_IN_OUR_CONTEXT = ()  # launch errors that mean "another device's context is current"


def _driver():
    global _drv, _SUCCESS, _RETRY_IN_OUR_CONTEXT
    if _drv is None:
        from cuda.bindings import driver

        _drv, _SUCCESS = driver, driver.CUresult.CUDA_SUCCESS
        codes = driver.CUresult
        _RETRY_IN_OUR_CONTEXT = (codes.CUDA_ERROR_INVALID_CONTEXT, codes.CUDA_ERROR_INVALID_HANDLE,
                                 codes.CUDA_ERROR_CONTEXT_IS_DESTROYED)
    return _drv


def check(result, what: str):
    """Unpack a cuda.bindings result tuple, raising on a non-success code."""
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaDriverError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


_contexts: dict[int, object] = {}


def primary_context(device_index: int):
    """The device's primary context (torch's), retained once per process."""
    ctx = _contexts.get(device_index)
    if ctx is None:
        driver = _driver()
        torch.cuda.init()
        check(driver.cuInit(0), "cuInit")
        dev = check(driver.cuDeviceGet(device_index), "cuDeviceGet")
        ctx = _contexts[device_index] = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    return ctx


class device_context:
    """Make the device's primary context current on this thread for the block (driver calls
    outside a launch: occupancy queries, tensor-map encoding)."""

    def __init__(self, device_index):
        self.ctx = primary_context(device_index)

    def __enter__(self):
        check(_driver().cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")

    def __exit__(self, *exc):
        check(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")


def device_arch(device_index: int) -> str:
    """The exact NVRTC target for a device: sm_90a on Hopper (wgmma etc.), sm_XY elsewhere."""
    major, minor = torch.cuda.get_device_capability(device_index)
    suffix = "a" if (major, minor) in ((9, 0), (10, 0), (10, 3), (12, 0), (12, 1)) else ""
    return f"sm_{major}{minor}{suffix}"


_sm_counts: dict[int, int] = {}


def sm_count(device_index: int) -> int:
    count = _sm_counts.get(device_index)
    if count is None:
        count = _sm_counts[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return count


class Launcher:
    """A loaded kernel on one device; call it with grid, block, args."""

    __slots__ = ("function", "types", "device_index", "name", "_module", "max_dynamic_smem", "_slots",
                 "_param_array", "_params", "_lock", "_resident", "_pdl_config")

    def __init__(self, name: str, cubin: bytes, entry: str, arg_types: tuple[str, ...], device_index: int):
        driver = _driver()
        self.name, self.device_index = name, device_index
        self.types = tuple(ARG_TYPES[t] for t in arg_types)
        with device_context(device_index):
            self._module = check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
            self.function = check(driver.cuModuleGetFunction(self._module, entry.encode()),
                                  f"cuModuleGetFunction({name}, {entry})")
        self.max_dynamic_smem = 0
        # Kernel parameters live in preallocated ctypes slots; cuLaunchKernel gets the address of
        # the pointer array (cheaper than letting cuda.bindings pack a (values, types) tuple).
        # The driver copies the values during the call, so a lock around fill+launch suffices.
        # A struct argument has no slot: its own address goes into the pointer array per call.
        self._slots = tuple(t() if t is not None else i for i, t in enumerate(self.types))
        self._param_array = (ctypes.c_void_p * max(1, len(self._slots)))(
            *(ctypes.addressof(s) if not isinstance(s, int) else 0 for s in self._slots))
        self._params = ctypes.addressof(self._param_array)
        self._lock = threading.Lock()
        self._resident: dict = {}
        self._pdl_config = None  # built at the first launch with pdl=True (None: not yet; False: no PDL here)

    def set_dynamic_smem(self, nbytes: int) -> None:
        """Allow more than 48 KiB of dynamic shared memory (once, before launches that need it)."""
        if nbytes > self.max_dynamic_smem:
            driver = _driver()
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            with device_context(self.device_index):
                check(driver.cuFuncSetAttribute(self.function, attr, nbytes), f"cuFuncSetAttribute({self.name})")
            self.max_dynamic_smem = nbytes

    def blocks_per_sm(self, threads: int, smem: int) -> int:
        """How many CTAs of this kernel fit on one multiprocessor (for persistent grids)."""
        driver = _driver()
        with device_context(self.device_index):
            return check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, threads, smem),
                         f"cuOccupancyMaxActiveBlocksPerMultiprocessor({self.name})")

    def resident_ctas(self, threads: int, smem: int = 0) -> int:
        """CTAs of this kernel the whole device holds at once (the size of a persistent grid)."""
        found = self._resident.get((threads, smem))
        if found is None:
            found = self._resident[(threads, smem)] = max(1, self.blocks_per_sm(threads, smem)) * sm_count(
                self.device_index)
        return found

    def __call__(self, grid, block, args, smem: int = 0, pdl: bool = False) -> None:
        """Launch on torch's current stream of this device.

        ``pdl=True`` (programmatic dependent launch, Hopper and later): the kernel may be scheduled
        while the previous kernel of the stream is still finishing, which hides the launch gap of a
        short kernel behind its producer's tail. Such a kernel must call ``pdl_wait()`` (common.cuh)
        before it touches memory the previous kernel reads or writes. Where the device cannot do it
        the launch is an ordinary one (the wait then returns at once).
        """
        stream = _raw_stream(self.device_index)
        with self._lock:
            for slot, value in zip(self._slots, args):
                if slot.__class__ is int:
                    self._param_array[slot] = ctypes.addressof(value)
                else:
                    slot.value = value
            config = self._pdl_config if pdl else False
            if config is None:
                config = self._pdl_config = self._make_pdl_config()
            if config:
                config.gridDimX, config.gridDimY, config.gridDimZ = grid
                config.blockDimX, config.blockDimY, config.blockDimZ = block
                config.sharedMemBytes, config.hStream = smem, stream
            err = self._launch(config, grid, block, smem, stream)
            if err != _SUCCESS and err in _RETRY_IN_OUR_CONTEXT:
                # The thread's current context belongs to another device: retry inside ours, with the
                # parameters still in place (hence inside the lock).
                with device_context(self.device_index):
                    err = self._launch(config, grid, block, smem, stream)
        if err != _SUCCESS:
            check((err,), f"launch {self.name} grid={grid} block={block} smem={smem}")

    def _launch(self, config, grid, block, smem, stream):
        if config:
            return _drv.cuLaunchKernelEx(config, self.function, self._params, 0)[0]
        return _drv.cuLaunchKernel(self.function, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                   stream, self._params, 0)[0]

    def _make_pdl_config(self):
        """A reusable launch configuration asking for programmatic stream serialisation (sm_90+)."""
        if not PDL or torch.cuda.get_device_capability(self.device_index)[0] < 9:
            return False
        driver = _driver()
        attr = driver.CUlaunchAttribute()
        attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        attr.value.programmaticStreamSerializationAllowed = 1
        config = driver.CUlaunchConfig()
        config.attrs, config.numAttrs = [attr], 1
        return config


try:  # import the driver bindings with linghe, not inside a user's first call
    _driver()
except ImportError:  # pragma: no cover - cuda-python missing: reported at the first launch
    pass
