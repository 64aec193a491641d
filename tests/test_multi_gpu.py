"""Several GPUs (two or more devices): every documented op on cuda:1 gives bitwise the results of cuda:0 (kernels
are loaded per device), also when called while cuda:0 is the current device, and in a CUDA graph captured on
cuda:1; two torchrun ranks sharing one fresh cache folder compile each kernel once between them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from multi_gpu_worker import cases, same, tensors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = sorted(cases())
D0, D1 = torch.device("cuda", 0), torch.device("cuda", 1)


def _twin_devices():
    """Bitwise comparison needs the same chip: persistent grids are sized by its multiprocessor count."""
    a, b = torch.cuda.get_device_properties(0), torch.cuda.get_device_properties(1)
    if (a.name, a.multi_processor_count) != (b.name, b.multi_processor_count):
        pytest.skip(f"cuda:0 ({a.name}) and cuda:1 ({b.name}) differ")


def _on(out, device):
    for t in tensors(out):
        assert t.device == device, f"an output is on {t.device}, not {device}"


@pytest.mark.parametrize("name", NAMES)
def test_op_on_cuda1_equals_cuda0(name):
    from linghe.kernel import REGISTRY
    from linghe.utils.gather import check_row_id_map_errors

    _twin_devices()
    make, fn = cases()[name]
    with torch.cuda.device(D0):
        want = fn(*make(D0, 1))
        # tensors on cuda:1 while cuda:0 is current: the first such call also loads cuda:1's kernels
        other = fn(*make(D1, 1))
    with torch.cuda.device(D1):
        got = fn(*make(D1, 1))
    _on(want, D0)
    _on(other, D1)
    _on(got, D1)
    same(other, want)
    same(got, want)
    for device in (D0, D1):
        check_row_id_map_errors(device)
    loaded = [(key, launcher) for kernel in REGISTRY.values() for key, launcher in kernel._hot.items()]
    assert any(key[0] == 1 for key, _ in loaded)
    for key, launcher in loaded:  # one module per device: a launcher runs on the device it was loaded for
        assert launcher.device_index == key[0], launcher.name


@pytest.mark.parametrize("name", NAMES)
def test_graph_captured_on_cuda1(name):
    make, fn = cases()[name]
    with torch.cuda.device(D1):
        static = list(make(D1, 1))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*static)  # warm-up: loads every kernel (both directions) on cuda:1 outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn(*static)
        fresh = make(D1, 2)
        for s, t in zip(static, fresh):
            s.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        _on(captured, D1)
        same(captured, fn(*fresh))


def test_two_torchrun_ranks_compile_each_key_once(tmp_path):
    from linghe.cache import DiskCache

    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, LINGHE_CACHE_DIR=str(cache_dir),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LINGHE_STRICT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "multi_gpu_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = set(ranks[0]["keys"])
    assert keys and set(ranks[1]["keys"]) == keys  # both ranks ran the same kernels
    disk = DiskCache(cache_dir)
    assert {e["key"] for e in disk.entries()} == keys  # one entry per key, nothing else
    assert all(disk.get(key) is not None for key in keys)  # each one intact
    assert not list(cache_dir.rglob("*.tmp"))
    compiles = [r["stats"]["compiles"] for r in ranks]
    assert sum(compiles) == len(keys), f"compiles per rank {compiles} for {len(keys)} distinct kernels"
