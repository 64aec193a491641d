"""Jinja2 rendering of kernel templates and NVRTC compilation to a cubin.

Templates live in ``linghe/templates``: ``*.cu.j2`` are rendered per
specialisation; ``*.cuh`` are plain CUDA headers handed to NVRTC in memory
(no include path, no CUDA toolkit headers: that keeps a cold compile fast).

Rendering inserts ``#line`` directives after every Jinja statement line, so
NVRTC reports errors in template coordinates; :class:`CompileError` shows
the rendered lines behind each error as well.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import config

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
_LINE_DIRECTIVE = re.compile(r'^#line (\d+) "([^"]+)"$')
_ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")
_LOG_LOCATION = re.compile(r'^(.+?)\((\d+)\): (error|warning)', re.MULTILINE)


class CompileError(RuntimeError):
    """NVRTC rejected a rendered kernel. Carries the log, an excerpt, the saved .cu."""

    def __init__(self, name: str, log: str, excerpt: str, cu_path: str | None):
        self.name, self.log, self.excerpt, self.cu_path = name, log, excerpt, cu_path
        where = f"\nrendered source saved at {cu_path}" if cu_path else ""
        super().__init__(f"NVRTC failed to compile {name}:\n{log.strip()}\n\n{excerpt}{where}")


@lru_cache(maxsize=None)
def template_text(name: str) -> str:
    if "/" in name or "\\" in name:
        raise FileNotFoundError(name)
    return (TEMPLATE_DIR / name).read_text()


@lru_cache(maxsize=None)
def template_fingerprint(template: str) -> str:
    """Hash of a template and every header in the folder: cheap, and enough to find a cached
    render of it without importing Jinja (the warm first call of a new process)."""
    import hashlib

    digest = hashlib.sha256(template_text(template).encode())
    for path in sorted(TEMPLATE_DIR.glob("*.cuh")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _annotate(name: str, text: str) -> str:
    """Add ``#line`` directives after Jinja statement/comment lines (never ``#line 0``)."""
    out = [f'#line 1 "{name}"']
    for number, line in enumerate(text.split("\n"), start=1):
        out.append(line)
        stripped = line.strip()
        if (stripped.startswith("{%") and stripped.endswith("%}")) or (
            stripped.startswith("{#") and stripped.endswith("#}")
        ):
            out.append(f'#line {number + 1} "{name}"')
    return "\n".join(out)


@lru_cache(maxsize=1)
def _environment():
    import jinja2  # imported on first render only: a warm process never needs it

    class AnnotatingLoader(jinja2.BaseLoader):
        def get_source(self, environment, template):
            try:
                text = template_text(template)
            except FileNotFoundError:
                raise jinja2.TemplateNotFound(template) from None
            return _annotate(template, text), None, lambda: True

    return jinja2.Environment(
        loader=AnnotatingLoader(),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, constants: dict) -> str:
    """Render one template with its compile-time constants (StrictUndefined)."""
    source = _environment().get_template(template).render(**constants)
    # Directives that are immediately followed by another directive are noise.
    lines = source.split("\n")
    kept = [l for i, l in enumerate(lines)
            if not (l.startswith("#line ") and i + 1 < len(lines) and lines[i + 1].startswith("#line "))]
    return "\n".join(kept)


def headers_for(source: str) -> dict[str, str]:
    """The package headers a source includes, transitively: {name: contents}."""
    found: dict[str, str] = {}
    pending = _INCLUDE.findall(source)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        try:
            found[name] = template_text(name)
        except FileNotFoundError:
            raise FileNotFoundError(f"kernel source includes {name!r}, which linghe/templates lacks") from None
        pending.extend(_INCLUDE.findall(found[name]))
    return dict(sorted(found.items()))


def check_arch(arch: str) -> str:
    if not _ARCH.match(arch):
        raise ValueError(f"arch must look like 'sm_90a' or 'sm_80', got {arch!r}")
    return arch.replace("compute_", "sm_")


def nvrtc_options(arch: str) -> list[str]:
    # No --use_fast_math: the quantisation needs IEEE division (SPEC §3.1).
    return [f"--gpu-architecture={check_arch(arch)}", "-std=c++17", "--device-as-default-execution-space",
            *config.extra_nvrtc_options()]


@lru_cache(maxsize=1)
def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "nvrtcVersion")
    return f"{major}.{minor}"


def _check(err, what):
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")


@dataclass
class CompileResult:
    cubin: bytes
    log: str
    milliseconds: float


def compile_cubin(name: str, source: str, headers: dict[str, str], options: list[str],
                  save_failed_source=None) -> CompileResult:
    """Compile one rendered source to a cubin. ``save_failed_source(source) -> path`` keeps the .cu on error."""
    from cuda.bindings import nvrtc

    start = time.perf_counter()
    names = [n.encode() for n in headers]
    bodies = [b.encode() for b in headers.values()]
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), len(names), bodies, names)
    _check(err, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(err, "nvrtcGetProgramLogSize")
        # Writable buffers: NVRTC writes into them (never into an immutable, possibly shared bytes object).
        raw = bytearray(size)
        (err,) = nvrtc.nvrtcGetProgramLog(prog, raw)
        log = bytes(raw).rstrip(b"\x00").decode(errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            path = save_failed_source(source) if save_failed_source else None
            raise CompileError(name, log, error_excerpt(log, source, headers), path)
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(err, "nvrtcGetCUBINSize")
        buffer = bytearray(size)
        (err,) = nvrtc.nvrtcGetCUBIN(prog, buffer)
        _check(err, "nvrtcGetCUBIN")
        cubin = bytes(buffer)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompileResult(cubin, log, (time.perf_counter() - start) * 1000.0)


def line_map(source: str) -> list[tuple[str, int]]:
    """For each rendered line (0-based index), its (file, line) after ``#line`` directives."""
    mapping, current_file, current_line = [], "<rendered>", 1
    for line in source.split("\n"):
        m = _LINE_DIRECTIVE.match(line)
        if m:
            mapping.append((current_file, -1))
            current_line, current_file = int(m.group(1)), m.group(2)
            continue
        mapping.append((current_file, current_line))
        current_line += 1
    return mapping


def error_excerpt(log: str, source: str, headers: dict[str, str], context: int = 2) -> str:
    """The rendered lines behind each error location in the NVRTC log, numbered."""
    rendered = source.split("\n")
    mapping = line_map(source)
    parts = []
    for file, line, kind in {(m.group(1), int(m.group(2)), m.group(3)) for m in _LOG_LOCATION.finditer(log)}:
        base = file.rsplit("/", 1)[-1]
        if base in headers:
            text = headers[base].split("\n")
            snippet = [f"  {base}:{i + 1}: {text[i]}" for i in range(max(0, line - 1 - context), min(len(text), line + context))]
            parts.append(f"{kind} at {base}:{line}\n" + "\n".join(snippet))
            continue
        hits = [i for i, (f, l) in enumerate(mapping) if f.endswith(base) and l == line]
        if not hits and base.endswith(".cu"):  # no directives: the log counts rendered lines
            hits = [line - 1]
        for i in hits[:3]:
            lo, hi = max(0, i - context), min(len(rendered), i + context + 1)
            snippet = [f"  rendered {j + 1} ({mapping[j][0]}:{mapping[j][1]}): {rendered[j]}"
                       for j in range(lo, hi) if mapping[j][1] >= 0]
            parts.append(f"{kind} at {file}:{line} (rendered line {i + 1})\n" + "\n".join(snippet))
    return "\n".join(sorted(parts)) if parts else "(no source location in the log)"
