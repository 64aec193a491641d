"""The small object that ties a specialisation to the cache and a launch.

An op declares one :class:`Kernel` per template: its compile-time parameter
names (fixed for a model: hidden size, dtypes, modes) and its kernel-argument
types (run time: pointers, row counts, eps). The wrapper asks
``kernel.launcher(device, *constants)`` on every call; after the first call
that is one dict lookup, with no rendering or hashing.

The compiler, cache and runtime know nothing of any particular op.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from . import cache as cache_mod
from . import compiler, config

log = logging.getLogger("linghe")

REGISTRY: dict[str, "Kernel"] = {}
_PREWARM: dict[str, object] = {}


class StrictModeError(RuntimeError):
    """A kernel was about to be compiled at run time while LINGHE_STRICT=1."""


class CaptureError(RuntimeError):
    """A kernel was about to be compiled or loaded while the stream is capturing a CUDA graph."""


def _constant_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Spec:
    """One specialisation: an op and its compile-time constants, for one arch."""

    op: str
    constants: tuple  # ((name, value), ...) in the kernel's parameter order
    arch: str

    @property
    def params(self) -> dict:
        return dict(self.constants)

    def describe(self) -> str:
        consts = ",".join(f"{k}={_constant_text(v)}" for k, v in self.constants)
        return f"{self.op}[{consts}]@{self.arch}"

    def prewarm_command(self) -> str:
        consts = " ".join(f"{k}={_constant_text(v)}" for k, v in self.constants)
        return f"linghe prewarm --arch {self.arch} --op {self.op} {consts}"


class Kernel:
    def __init__(self, op: str, template: str, entry: str, params: tuple[str, ...], arg_types: tuple[str, ...],
                 context=None):
        """``context(**constants) -> dict`` may add derived template variables (tile sizes etc.)."""
        if op in REGISTRY:
            raise ValueError(f"kernel op {op!r} is registered twice")
        self.op, self.template, self.entry = op, template, entry
        self.params, self.arg_types = tuple(params), tuple(arg_types)
        self._context = context
        self._hot: dict[tuple, object] = {}
        self._lock = threading.Lock()
        REGISTRY[op] = self

    # -- specialisations ---------------------------------------------------
    def spec(self, arch: str, **constants) -> Spec:
        missing = [p for p in self.params if p not in constants]
        extra = [k for k in constants if k not in self.params]
        if missing or extra:
            raise TypeError(f"{self.op} takes constants {list(self.params)}; missing {missing}, unexpected {extra}")
        return Spec(self.op, tuple((p, constants[p]) for p in self.params), compiler.check_arch(arch))

    def render(self, spec: Spec) -> str:
        context = dict(spec.params)
        if self._context is not None:
            context.update(self._context(**spec.params))
        context["KERNEL_NAME"] = self.entry
        return compiler.render(self.template, context)

    def index_digest(self, spec: Spec) -> str:
        """Digest of everything the rendered source depends on, computed without rendering."""
        import hashlib
        import json

        derived = self._context(**spec.params) if self._context is not None else None  # tiling choices too
        material = json.dumps([cache_mod.KEY_SCHEMA, self.op, self.template, self.entry, [list(c) for c in spec.constants],
                               derived, spec.arch, compiler.nvrtc_options(spec.arch),
                               compiler.template_fingerprint(self.template)], sort_keys=True, default=str)
        return hashlib.sha256(material.encode()).hexdigest()

    def build(self, spec: Spec, disk: cache_mod.DiskCache | None = None, *, allow_compile: bool = True):
        """(entry, compiled_now) for a spec: from the disk cache, else compiled and published.

        A spec seen before is found through the cache's spec index (no Jinja, no NVRTC load);
        otherwise the source is rendered and its content key looked up.
        """
        disk = disk or cache_mod.default_cache()
        digest = self.index_digest(spec)
        known = disk.index_get(digest)
        if known is not None:
            entry = disk.get(known)
            if entry is not None:
                return entry, False
        entry, compiled = self._build_from_source(spec, disk, allow_compile)
        disk.index_put(digest, entry.key)
        return entry, compiled

    def _build_from_source(self, spec, disk, allow_compile):
        source = self.render(spec)
        headers = compiler.headers_for(source)
        options = compiler.nvrtc_options(spec.arch)
        key = cache_mod.make_key(source, headers, compiler.nvrtc_version(), spec.arch, options)
        entry = disk.get(key)
        if entry is not None:
            return entry, False
        if not allow_compile:
            raise StrictModeError(f"linghe: kernel {spec.describe()} is not in the cache at {disk.root} and "
                                  f"LINGHE_STRICT is set. Prewarm it: {spec.prewarm_command()}")
        with disk.compile_lock(key):
            entry = disk.get(key)  # another process may have published it while we waited
            if entry is not None:
                return entry, False
            result = compiler.compile_cubin(self.op, source, headers, options,
                                            save_failed_source=lambda s: disk.save_failed_source(self.op, s))
            meta = {"op": self.op, "constants": {k: v for k, v in spec.constants}, "arch": spec.arch,
                    "compile_ms": round(result.milliseconds, 2), "nvrtc": compiler.nvrtc_version(),
                    "options": options, "entry": self.entry, "log": result.log}
            log.info("linghe: compiled %s in %.0f ms", spec.describe(), result.milliseconds)
            return disk.put(key, result.cubin, source, meta), True

    # -- the launch path ---------------------------------------------------
    def launcher(self, device, *values):
        """The loaded kernel for ``device`` and constants given positionally in ``params`` order."""
        hot_key = (device.index, *values)
        found = self._hot.get(hot_key)
        if found is None:
            found = self._load(device, values, hot_key)
        return found

    def _load(self, device, values, hot_key):
        import torch

        from . import runtime

        with self._lock:
            if hot_key in self._hot:
                return self._hot[hot_key]
            index = device.index if device.index is not None else torch.cuda.current_device()
            spec = self.spec(runtime.device_arch(index), **dict(zip(self.params, values)))
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise CaptureError(f"linghe: kernel {spec.describe()} would be compiled or loaded while the current "
                                   f"stream is capturing a CUDA graph. Call the op once before capture, or "
                                   f"prewarm: {spec.prewarm_command()}")
            start = time.perf_counter()
            entry, compiled = self.build(spec, allow_compile=not config.strict())
            launcher = runtime.Launcher(spec.describe(), entry.cubin, self.entry, self.arg_types, index)
            log.debug("linghe: %s ready in %.1f ms (compiled=%s)", spec.describe(),
                      (time.perf_counter() - start) * 1000, compiled)
            self._hot[hot_key] = launcher
            return launcher

    def loaded(self) -> int:
        """How many (device, specialisation) launchers this process holds (tests use it)."""
        return len(self._hot)


def register_prewarm(name: str):
    """Decorator: ``fn(preset: dict) -> iterable of (kernel, constants)`` for ``linghe prewarm``."""
    def wrap(fn):
        _PREWARM[name] = fn
        return fn
    return wrap


def load_all_ops() -> None:
    """Import every op module so its kernels and prewarm functions register."""
    import importlib
    import pkgutil

    for package in ("linghe.utils", "linghe.facade"):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{package}.{info.name}")


def prewarm_specs(preset: dict, arch: str) -> list[tuple[Kernel, Spec]]:
    load_all_ops()
    seen, specs = set(), []
    for name in sorted(_PREWARM):
        for kernel, constants in _PREWARM[name](preset):
            spec = kernel.spec(arch, **constants)
            if spec not in seen:
                seen.add(spec)
                specs.append((kernel, spec))
    return specs
