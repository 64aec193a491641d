"""The runtime's Python side (parameter packing, context retry, occupancy) against a fake driver (CPU)."""
import ctypes
import enum

import pytest

from linghe import runtime


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_CONTEXT_IS_DESTROYED = 709
    CUDA_ERROR_LAUNCH_FAILED = 719


class FakeDriver:
    CUresult = CUresult

    def __init__(self):
        self.calls, self.launches, self.fail_next = [], [], []

    def cuCtxPushCurrent(self, ctx):
        self.calls.append(("push", ctx))
        return (CUresult.CUDA_SUCCESS,)

    def cuCtxPopCurrent(self):
        self.calls.append(("pop",))
        return (CUresult.CUDA_SUCCESS, None)

    def cuModuleLoadData(self, cubin):
        self.calls.append(("load", cubin))
        return (CUresult.CUDA_SUCCESS, "module")

    def cuModuleGetFunction(self, module, name):
        return (CUresult.CUDA_SUCCESS, f"function:{name.decode()}")

    def cuOccupancyMaxActiveBlocksPerMultiprocessor(self, function, threads, smem):
        self.calls.append(("occupancy", threads, smem))
        return (CUresult.CUDA_SUCCESS, 3)

    def cuGetErrorName(self, err):
        return (CUresult.CUDA_SUCCESS, CUresult(err).name.encode())

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        if isinstance(params, int):  # the preallocated pointer array: read what the kernel would get
            pointers = (ctypes.c_void_p * 4).from_address(params)
            values = (ctypes.c_int64.from_address(pointers[0]).value, ctypes.c_float.from_address(pointers[1]).value,
                      ctypes.c_void_p.from_address(pointers[2]).value, pointers[3])
        else:
            values = params
        self.launches.append(((gx, gy, gz), (bx, by, bz), smem, stream, values))
        return (self.fail_next.pop(0),) if self.fail_next else (CUresult.CUDA_SUCCESS,)


class Table(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("ptr", ctypes.c_void_p)]


@pytest.fixture
def fake(monkeypatch):
    driver = FakeDriver()
    monkeypatch.setattr(runtime, "_drv", driver)
    monkeypatch.setattr(runtime, "_SUCCESS", CUresult.CUDA_SUCCESS)
    monkeypatch.setattr(runtime, "_RETRY_IN_OUR_CONTEXT", (CUresult.CUDA_ERROR_INVALID_CONTEXT,
                                                           CUresult.CUDA_ERROR_INVALID_HANDLE,
                                                           CUresult.CUDA_ERROR_CONTEXT_IS_DESTROYED))
    monkeypatch.setattr(runtime, "_driver", lambda: driver)
    monkeypatch.setattr(runtime, "primary_context", lambda index: f"ctx{index}")
    monkeypatch.setattr(runtime, "_raw_stream", lambda index: 1234 + index)
    monkeypatch.setattr(runtime, "_sm_counts", {0: 132, 1: 132})
    return driver


def test_module_is_loaded_inside_the_devices_context(fake):
    runtime.Launcher("k", b"cubin", "entry", ("i64", "f32", "ptr", "struct"), 1)
    assert fake.calls[:3] == [("push", "ctx1"), ("load", b"cubin"), ("pop",)]


def test_arguments_reach_the_kernel_by_value(fake):
    launch = runtime.Launcher("k", b"cubin", "entry", ("i64", "f32", "ptr", "struct"), 0)
    table = Table(7, 0xABC0)
    launch((5, 1, 1), (256, 1, 1), (2**40 + 3, 0.5, 0xDEAD0, table), smem=4096)
    grid, block, smem, stream, (n, eps, ptr, struct_address) = fake.launches[-1]
    assert (grid, block, smem, stream) == ((5, 1, 1), (256, 1, 1), 4096, 1234)
    assert (n, eps, ptr) == (2**40 + 3, 0.5, 0xDEAD0)
    assert struct_address == ctypes.addressof(table)
    launch((1, 1, 1), (32, 1, 1), (1, 2.0, 0, table))  # a second call overwrites every slot
    assert fake.launches[-1][4][:3] == (1, 2.0, None)


def test_launch_from_another_devices_context_retries_inside_ours(fake):
    launch = runtime.Launcher("k", b"cubin", "entry", ("i64", "f32", "ptr", "struct"), 1)
    fake.calls.clear()
    fake.fail_next = [CUresult.CUDA_ERROR_INVALID_CONTEXT]
    launch((1, 1, 1), (32, 1, 1), (4, 1.0, None, Table(1, 2)))  # a null pointer argument too
    assert fake.calls == [("push", "ctx1"), ("pop",)]
    assert len(fake.launches) == 2
    assert fake.launches[1][4][:3] == (4, 1.0, None)  # the retry passes the same parameters


def test_other_launch_errors_raise_with_the_kernels_name(fake):
    launch = runtime.Launcher("my_kernel", b"cubin", "entry", ("i64", "f32", "ptr", "struct"), 0)
    fake.fail_next = [CUresult.CUDA_ERROR_LAUNCH_FAILED]
    with pytest.raises(runtime.CudaDriverError, match="my_kernel.*CUDA_ERROR_LAUNCH_FAILED"):
        launch((1, 1, 1), (32, 1, 1), (4, 1.0, 16, Table(1, 2)))


def test_resident_ctas_is_occupancy_times_sms_and_asked_once(fake):
    launch = runtime.Launcher("k", b"cubin", "entry", ("i64",), 0)
    assert launch.resident_ctas(512, 1024) == 3 * 132
    assert launch.resident_ctas(512, 1024) == 3 * 132
    assert [c for c in fake.calls if c[0] == "occupancy"] == [("occupancy", 512, 1024)]


class _Record:
    """Stands for a cuda.bindings struct: attributes are simply stored."""


class _AttrIDs:
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class PdlDriver(FakeDriver):
    CUlaunchAttributeID = _AttrIDs

    @staticmethod
    def CUlaunchAttribute():
        attr = _Record()
        attr.value = _Record()
        return attr

    CUlaunchConfig = _Record

    def cuLaunchKernelEx(self, config, f, params, extra):
        attr = config.attrs[0]
        assert config.numAttrs == 1 and attr.value.programmaticStreamSerializationAllowed == 1
        assert attr.id == _AttrIDs.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        value = ctypes.c_int64.from_address((ctypes.c_void_p * 1).from_address(params)[0]).value
        self.launches.append(("pdl", (config.gridDimX, config.gridDimY, config.gridDimZ),
                              (config.blockDimX, config.blockDimY, config.blockDimZ), config.sharedMemBytes,
                              config.hStream, value))
        return (CUresult.CUDA_SUCCESS,)


@pytest.mark.parametrize("major,enabled,expect_pdl", [(9, True, True), (8, True, False), (9, False, False)])
def test_pdl_launch_only_where_the_device_and_the_switch_allow(monkeypatch, major, enabled, expect_pdl):
    driver = PdlDriver()
    for name, value in (("_drv", driver), ("_SUCCESS", CUresult.CUDA_SUCCESS), ("_driver", lambda: driver),
                        ("primary_context", lambda index: "ctx"), ("_raw_stream", lambda index: 77),
                        ("PDL", enabled)):
        monkeypatch.setattr(runtime, name, value)
    monkeypatch.setattr(runtime.torch.cuda, "get_device_capability", lambda index: (major, 0))
    launch = runtime.Launcher("k", b"cubin", "entry", ("i64", "f32", "ptr", "struct"), 0)
    table = Table(1, 2)
    launch((3, 2, 1), (64, 1, 1), (41, 1.0, 0, table), smem=512, pdl=True)
    launch((1, 1, 1), (32, 1, 1), (42, 1.0, 0, table), pdl=True)  # the configuration is reused with new values
    launch((1, 1, 1), (32, 1, 1), (43, 1.0, 0, table))             # pdl=False: an ordinary launch
    if expect_pdl:
        assert driver.launches[0] == ("pdl", (3, 2, 1), (64, 1, 1), 512, 77, 41)
        assert driver.launches[1] == ("pdl", (1, 1, 1), (32, 1, 1), 0, 77, 42)
    else:
        assert [entry[0] for entry in driver.launches[:2]] == [(3, 2, 1), (1, 1, 1)]
    assert driver.launches[2][0] == (1, 1, 1) and driver.launches[2][4][0] == 43
