"""Disk cache semantics (CPU only): keys, atomic publish, corruption, concurrency, read-only, LRU."""
import json
import os
import subprocess
import sys
import warnings

import pytest

from linghe import cache as cache_mod
from linghe.cache import DiskCache, make_key
from linghe.utils.norm import NORM_ROWS

SPEC = NORM_ROWS.spec("sm_90a", N=256, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=True)


def test_key_is_content_addressed_and_relocatable():
    a = make_key("src", {"h.cuh": "x"}, "13.0", "sm_90a", ["-O3"])
    assert a == make_key("src", {"h.cuh": "x"}, "13.0", "sm_90a", ["-O3"])
    for changed in (make_key("src2", {"h.cuh": "x"}, "13.0", "sm_90a", ["-O3"]),
                    make_key("src", {"h.cuh": "y"}, "13.0", "sm_90a", ["-O3"]),
                    make_key("src", {"h.cuh": "x"}, "13.1", "sm_90a", ["-O3"]),
                    make_key("src", {"h.cuh": "x"}, "13.0", "sm_90", ["-O3"]),
                    make_key("src", {"h.cuh": "x"}, "13.0", "sm_90a", ["-O2"])):
        assert changed != a


def test_entry_is_cubin_source_and_metadata(tmp_path):
    disk = DiskCache(tmp_path)
    entry, compiled = NORM_ROWS.build(SPEC, disk)
    assert compiled
    cubin, cu, meta = disk.paths(entry.key)
    assert cubin.read_bytes() == entry.cubin and "__global__" in cu.read_text()
    info = json.loads(meta.read_text())
    assert info["op"] == "rms_norm_rows_quant" and info["arch"] == "sm_90a" and info["constants"]["N"] == 256
    assert not [p for p in tmp_path.rglob("*.tmp")], "temporary files left behind"
    again, compiled = NORM_ROWS.build(SPEC, DiskCache(tmp_path))  # a new process: found via the index
    assert not compiled and again.cubin == entry.cubin


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_json", "missing_cubin"])
def test_corrupt_entry_is_recompiled(tmp_path, damage):
    disk = DiskCache(tmp_path)
    entry, _ = NORM_ROWS.build(SPEC, disk)
    cubin, _, meta = disk.paths(entry.key)
    if damage == "truncate":
        cubin.write_bytes(entry.cubin[: len(entry.cubin) // 2])
    elif damage == "garbage":
        cubin.write_bytes(b"\0" * len(entry.cubin))
    elif damage == "bad_json":
        meta.write_text("{not json")
    else:
        cubin.unlink()
    fresh, compiled = NORM_ROWS.build(SPEC, DiskCache(tmp_path))
    assert compiled and fresh.cubin == entry.cubin
    assert DiskCache(tmp_path).get(entry.key).cubin == entry.cubin


def test_read_only_folder_degrades_to_memory_with_one_warning(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        disk = DiskCache(root)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry, compiled = NORM_ROWS.build(SPEC, disk)
            other = NORM_ROWS.spec("sm_90a", N=384, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=True)
            NORM_ROWS.build(other, disk)
        assert compiled and entry.cubin[:4] == b"\x7fELF"
        assert len([w for w in caught if "not writable" in str(w.message)]) == 1
        assert NORM_ROWS.build(SPEC, disk)[1] is False  # served from memory
    finally:
        os.chmod(root, 0o755)


def test_read_only_folder_as_root_is_simulated(tmp_path, monkeypatch):
    """Root ignores permission bits: make every write fail instead."""
    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_mod, "_atomic_write", refuse)
    disk = DiskCache(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry, compiled = NORM_ROWS.build(SPEC, disk)
        assert NORM_ROWS.build(SPEC, disk)[1] is False
    assert compiled and not disk.writable
    assert len([w for w in caught if "not writable" in str(w.message)]) == 1


def test_lru_eviction_keeps_the_bound(tmp_path, monkeypatch):
    disk = DiskCache(tmp_path)
    keys = []
    for n in (128, 256, 384, 512):
        spec = NORM_ROWS.spec("sm_90a", N=n, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=False)
        keys.append(NORM_ROWS.build(spec, disk)[0].key)
        os.utime(disk.paths(keys[-1])[2], (1000 + n, 1000 + n))  # distinct last-use times
    os.utime(disk.paths(keys[0])[2], None)                       # the oldest was just used
    sizes = {e["key"]: e["disk_bytes"] for e in disk.entries()}
    limit = sizes[keys[0]] + sizes[keys[3]] + 10
    removed = disk.evict(limit)
    left = {e["key"] for e in disk.entries()}
    assert removed == 2 and left == {keys[0], keys[3]}
    assert sum(e["disk_bytes"] for e in disk.entries()) <= limit


def test_clear(tmp_path):
    disk = DiskCache(tmp_path)
    NORM_ROWS.build(SPEC, disk)
    assert disk.clear() == 1 and disk.entries() == []


_RACE = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from linghe.cache import DiskCache
from linghe.utils.norm import NORM_ROWS
spec = NORM_ROWS.spec("sm_90a", N=640, DTYPE="bf16", WDTYPE="f32", ROUND_SCALE=False)
while time.time() < float(sys.argv[3]):
    time.sleep(0.001)
entry, compiled = NORM_ROWS.build(spec, DiskCache(sys.argv[1]))
print(entry.key, int(compiled))
"""


def test_eight_processes_compiling_one_kernel_at_once(tmp_path):
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = str(time.time() + 3.0)  # let all eight import first, then start together
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), root, start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    keys = {out.split()[0] for out, _ in results}
    assert len(keys) == 1
    compiles = sum(int(out.split()[1]) for out, _ in results)
    assert compiles >= 1
    entries = DiskCache(tmp_path).entries()
    assert len(entries) == 1
    assert DiskCache(tmp_path).get(keys.pop()) is not None
    assert not [p for p in tmp_path.rglob("*.tmp")]
