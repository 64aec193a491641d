"""Every LINGHE_* environment knob, declared once.

Values are read when asked for (not at import), so tests and the CLI can change
the environment of a running process.
"""
from __future__ import annotations

import os
from pathlib import Path

# name -> (default, help); README.md documents the same table.
KNOBS = {
    "LINGHE_CACHE_DIR": (None, "folder of the on-disk kernel cache (default: platformdirs user cache dir)"),
    "LINGHE_CACHE_MAX_MB": ("2048", "size bound of the disk cache in MiB; least recently used entries go first"),
    "LINGHE_STRICT": ("0", "1: any compile at run time is an error naming the key to prewarm"),
    "LINGHE_NVRTC_OPTIONS": ("", "extra NVRTC options, space separated (part of the cache key)"),
}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else KNOBS[name][0]


def cache_dir() -> Path:
    explicit = _raw("LINGHE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("linghe"))


def cache_max_bytes() -> int:
    text = _raw("LINGHE_CACHE_MAX_MB")
    try:
        return int(float(text) * 1024 * 1024)
    except ValueError:
        raise ValueError(f"LINGHE_CACHE_MAX_MB must be a number of MiB, got {text!r}") from None


def strict() -> bool:
    return _raw("LINGHE_STRICT").strip().lower() in ("1", "true", "yes", "on")


def extra_nvrtc_options() -> list[str]:
    return _raw("LINGHE_NVRTC_OPTIONS").split()
