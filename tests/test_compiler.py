"""Rendering, #line mapping and compile errors (CPU only)."""
import pytest

from linghe import compiler
from linghe.cache import DiskCache
from linghe.kernel import Kernel


def test_annotate_adds_line_directives_after_statements_never_line_zero():
    text = "a\n{% if X %}\nb\n{% endif %}\nc"
    out = compiler._annotate("t.cu.j2", text).split("\n")
    assert out[0] == '#line 1 "t.cu.j2"'
    assert '#line 3 "t.cu.j2"' in out and '#line 5 "t.cu.j2"' in out
    assert not any(line.startswith("#line 0") for line in out)


def test_render_is_strict_about_missing_constants():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        compiler.render("norm_rows.cu.j2", {"N": 128})


def test_line_map_follows_directives():
    src = '#line 1 "a.j2"\nx\ny\n#line 10 "a.j2"\nz'
    assert compiler.line_map(src)[1:3] == [("a.j2", 1), ("a.j2", 2)]
    assert compiler.line_map(src)[4] == ("a.j2", 10)


def test_headers_are_found_transitively():
    headers = compiler.headers_for('#include "block_quant.cuh"\n')
    assert set(headers) == {"block_quant.cuh", "common.cuh"}
    with pytest.raises(FileNotFoundError, match="nope.cuh"):
        compiler.headers_for('#include "nope.cuh"\n')


def test_arch_is_checked():
    assert compiler.check_arch("sm_90a") == "sm_90a"
    with pytest.raises(ValueError, match="arch"):
        compiler.check_arch("hopper")


def test_compile_error_carries_log_mapped_lines_and_saved_source(tmp_path, monkeypatch):
    bad = tmp_path / "broken_test_kernel.cu.j2"
    bad.write_text('#include "common.cuh"\n{% if True %}\n'
                   'extern "C" __global__ void {{ KERNEL_NAME }}(float* y) {\n  y[0] = undefined_name;\n}\n{% endif %}\n')
    monkeypatch.setattr(compiler, "TEMPLATE_DIR", tmp_path)
    compiler.template_text.cache_clear()
    (tmp_path / "common.cuh").write_text("#pragma once\n")
    kernel = Kernel("broken_test_kernel", "broken_test_kernel.cu.j2", "broken", (), ("ptr",))
    try:
        with pytest.raises(compiler.CompileError) as info:
            kernel.build(kernel.spec("sm_90a"), DiskCache(tmp_path / "cache"))
    finally:
        compiler.template_text.cache_clear()
        compiler.template_fingerprint.cache_clear()
        from linghe.kernel import REGISTRY

        REGISTRY.pop("broken_test_kernel")
    err = info.value
    assert "undefined_name" in err.log
    assert "broken_test_kernel.cu.j2:4" in err.excerpt  # the template's line, through #line
    assert "y[0] = undefined_name" in err.excerpt        # and the rendered text with its number
    assert err.cu_path and open(err.cu_path).read().count("undefined_name") == 1
    assert err.cu_path in str(err)
