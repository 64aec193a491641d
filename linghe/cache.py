"""On-disk cubin cache: content-addressed keys, atomic publish, LRU bound.

An entry is three files in ``<dir>/<key[:2]>/``: ``<key>.cubin``, the rendered
``<key>.cu`` (what ran, for people to read) and ``<key>.json`` (op, constants,
arch, compile ms, sha256 and size of the cubin). The JSON is published last and
names the cubin's hash, so a reader that finds a truncated or corrupt cubin (or
a JSON it cannot parse) treats the entry as a miss and recompiles. Every file
is written to a temporary name in the same folder and moved with
``os.replace``: a crash leaves no half entry, and concurrent writers of the
same key end with one valid entry. An ``flock`` per key (with a timeout)
keeps processes that start together from compiling the same key twice.

If the folder cannot be written, the cache degrades to process memory with
one warning.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import config

KEY_SCHEMA = 1
LOCK_TIMEOUT_S = 120.0

# How this process came by its kernels (tests and diagnostics read it): "compiles" counts entries
# published after an NVRTC compile (Kernel._build_from_source calls put only then), "disk_hits" and
# "memory_hits" intact entries found. Touched when a kernel is loaded (once per device and
# specialisation), never on a warm launch.
STATS = {"compiles": 0, "disk_hits": 0, "memory_hits": 0}


def make_key(source: str, headers: dict[str, str], nvrtc_version: str, arch: str, options: list[str]) -> str:
    """Relocatable key: contents only (headers by package-relative name), no paths or times."""
    material = json.dumps(
        {"schema": KEY_SCHEMA, "source": source, "headers": headers, "nvrtc": nvrtc_version,
         "arch": arch, "options": options},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class Entry:
    key: str
    cubin: bytes
    meta: dict


class DiskCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else config.cache_dir()
        self.memory: dict[str, Entry] = {}
        self.memory_index: dict[str, str] = {}
        self.writable = True
        self._warned = False
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------
    def _folder(self, key: str) -> Path:
        return self.root / key[:2]

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        folder = self._folder(key)
        return folder / f"{key}.cubin", folder / f"{key}.cu", folder / f"{key}.json"

    # -- reading -----------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` if present and intact, else None (never raises for bad entries)."""
        if key in self.memory:
            STATS["memory_hits"] += 1
            return self.memory[key]
        cubin_path, _, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            cubin = cubin_path.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("cubin_sha256") != hashlib.sha256(cubin).hexdigest():
            return None
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # LRU: the JSON's mtime is the last use
        STATS["disk_hits"] += 1
        return Entry(key, cubin, meta)

    # -- the spec index: spec digest -> key, so a warm process skips rendering ----
    def index_get(self, digest: str) -> str | None:
        if digest in self.memory_index:
            return self.memory_index[digest]
        try:
            key = (self.root / "index" / digest).read_text().strip()
        except OSError:
            return None
        return key if len(key) == 64 else None

    def index_put(self, digest: str, key: str) -> None:
        self.memory_index[digest] = key
        if not self.writable:
            return
        try:
            (self.root / "index").mkdir(parents=True, exist_ok=True)
            _atomic_write(self.root / "index" / digest, key.encode())
        except OSError as error:
            self._degrade(error)

    # -- writing -----------------------------------------------------------
    def _degrade(self, error: OSError) -> None:
        self.writable = False
        if not self._warned:
            self._warned = True
            warnings.warn(f"linghe: kernel cache folder {self.root} is not writable ({error}); "
                          "compiled kernels are kept in memory for this process only. "
                          "Set LINGHE_CACHE_DIR to a writable folder.", RuntimeWarning, stacklevel=3)

    def put(self, key: str, cubin: bytes, source: str, meta: dict) -> Entry:
        STATS["compiles"] += 1
        meta = dict(meta, key=key, cubin_sha256=hashlib.sha256(cubin).hexdigest(), cubin_bytes=len(cubin),
                    created=time.time())
        entry = Entry(key, cubin, meta)
        if not self.writable:
            self.memory[key] = entry
            return entry
        cubin_path, cu_path, meta_path = self.paths(key)
        try:
            cubin_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cubin_path, cubin)
            _atomic_write(cu_path, source.encode())
            _atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())  # last: commits
        except OSError as error:
            self._degrade(error)
            self.memory[key] = entry
            return entry
        self.evict()
        return entry

    def save_failed_source(self, name: str, source: str) -> str:
        """Keep the .cu of a failed compile where a person can open it."""
        for folder in (self.root / "failed", Path(tempfile.gettempdir()) / "linghe-failed"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.cu"
                _atomic_write(path, source.encode())
                return str(path)
            except OSError:
                continue
        return "<could not be saved>"

    @contextlib.contextmanager
    def compile_lock(self, key: str):
        """Hold an exclusive flock on the key while compiling; give up waiting after LOCK_TIMEOUT_S."""
        if not self.writable:
            yield
            return
        try:
            import fcntl

            folder = self._folder(key)
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except (ImportError, OSError):
            yield
            return
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        break  # compile without the lock: still correct, maybe duplicated
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- listing and bounds ------------------------------------------------
    def entries(self) -> list[dict]:
        """Metadata of every intact-looking entry, with its size on disk and last use."""
        found = []
        if not self.root.is_dir():
            return found
        for meta_path in self.root.glob("??/*.json"):
            try:
                meta = json.loads(meta_path.read_text())
                key = meta_path.stem
                size = sum(p.stat().st_size for p in self.paths(key) if p.exists())
                found.append(dict(meta, key=key, disk_bytes=size, last_used=meta_path.stat().st_mtime))
            except (OSError, ValueError):
                continue
        return found

    def evict(self, max_bytes: int | None = None) -> int:
        """Remove least recently used entries until the cache fits; returns how many went."""
        limit = config.cache_max_bytes() if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(e["disk_bytes"] for e in entries)
        removed = 0
        for entry in sorted(entries, key=lambda e: e["last_used"]):
            if total <= limit:
                break
            self.remove(entry["key"])
            total -= entry["disk_bytes"]
            removed += 1
        return removed

    def remove(self, key: str) -> None:
        cubin_path, cu_path, meta_path = self.paths(key)
        for path in (meta_path, cubin_path, cu_path, cubin_path.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                path.unlink()
        self.memory.pop(key, None)

    def clear(self) -> int:
        keys = [e["key"] for e in self.entries()]
        for key in keys:
            self.remove(key)
        index = self.root / "index"
        if index.is_dir():
            for path in index.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()
        self.memory_index.clear()
        return len(keys)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_default: DiskCache | None = None
_default_root: Path | None = None


def default_cache() -> DiskCache:
    """The process-wide cache for the current LINGHE_CACHE_DIR (re-made if it changes)."""
    global _default, _default_root
    root = config.cache_dir()
    if _default is None or root != _default_root:
        _default, _default_root = DiskCache(root), root
    return _default
