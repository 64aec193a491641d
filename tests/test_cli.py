"""The ``linghe`` command line (CPU only, no GPU needed)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cache, check=True):
    env = dict(os.environ, LINGHE_CACHE_DIR=str(cache), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "linghe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_prewarm_one_op_then_cached(tmp_path):
    args = ["prewarm", "--arch", "sm_90a", "--op", "rms_norm_rows_quant", "N=768", "DTYPE=bf16", "WDTYPE=bf16",
            "ROUND_SCALE=true"]
    first = run(*args, cache=tmp_path)
    assert "1 compiled, 0 already cached, 0 failed" in first.stdout
    second = run(*args, cache=tmp_path)
    assert "0 compiled, 1 already cached" in second.stdout


def test_prewarm_without_gpu_needs_arch(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run("prewarm", "--op", "rms_norm_rows_quant", "N=768", cache=tmp_path, check=False)
    assert proc.returncode != 0 and "--arch" in proc.stderr


def test_source_prints_cuda(tmp_path):
    out = run("source", "rms_norm_tiles_quant", "N=2048", "DTYPE=bf16", "WDTYPE=bf16", "ROUND_SCALE=true",
              "FUSED=true", cache=tmp_path).stdout
    assert "__global__" in out and "__cluster_dims__" in out
    bad = run("source", "rms_norm_tiles_quant", "N=2048", cache=tmp_path, check=False)
    assert bad.returncode != 0 and "missing" in bad.stderr


def test_cache_path_list_stats_clear(tmp_path):
    run("prewarm", "--arch", "sm_90a", "--op", "rms_norm_rows_quant", "N=896", "DTYPE=bf16", "WDTYPE=f32",
        "ROUND_SCALE=false", cache=tmp_path)
    assert run("cache", "path", cache=tmp_path).stdout.strip() == str(tmp_path)
    listing = run("cache", "list", cache=tmp_path).stdout
    assert "rms_norm_rows_quant" in listing and "N=896" in listing and "sm_90a" in listing
    stats = run("cache", "stats", cache=tmp_path).stdout
    assert "entries: 1" in stats
    assert "removed 1" in run("cache", "clear", cache=tmp_path).stdout
    assert "entries: 0" in run("cache", "stats", cache=tmp_path).stdout


def test_ops_lists_every_registered_kernel(tmp_path):
    out = run("ops", cache=tmp_path).stdout
    for op in ("rms_norm_rows_quant", "rms_norm_tiles_quant"):
        assert op in out


def test_unknown_preset_and_op(tmp_path):
    assert "unknown preset" in run("prewarm", "--arch", "sm_90a", "--preset", "nope", cache=tmp_path,
                                   check=False).stderr
    assert "unknown op" in run("source", "nope", cache=tmp_path, check=False).stderr


def test_strict_mode_names_the_key_to_prewarm(tmp_path, monkeypatch):
    from linghe.cache import DiskCache
    from linghe.kernel import StrictModeError
    from linghe.utils.norm import NORM_ROWS

    spec = NORM_ROWS.spec("sm_90a", N=1152, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=True)
    with pytest.raises(StrictModeError, match="linghe prewarm --arch sm_90a --op rms_norm_rows_quant N=1152"):
        NORM_ROWS.build(spec, DiskCache(tmp_path), allow_compile=False)
    run(*spec.prewarm_command().split()[1:], cache=tmp_path)
    entry, compiled = NORM_ROWS.build(spec, DiskCache(tmp_path), allow_compile=False)
    assert not compiled and entry.cubin[:4] == b"\x7fELF"
